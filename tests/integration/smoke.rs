use crate::support::common;

use common::*;
use tungstenite::Message;

#[test]
fn echo_roundtrip_with_a_real_client() {
    let server = TestServer::start(&[]);
    let mut ws = server.client("/echo");
    ws.send(Message::Text("hello".into())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Text("hello".into()));
    ws.send(Message::Binary(vec![1, 2, 3])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Binary(vec![1, 2, 3]));
    ws.close(None).unwrap();
    server.stop().unwrap();
}
