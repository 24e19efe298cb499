//! The WebSocket protocol as sans-IO code: every function here works on
//! byte slices and returns values; nothing touches a socket or a clock.

pub mod client_handshake;
pub mod close;
pub mod close_handshake;
pub mod decoder;
pub mod deflate;
pub mod extensions;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod session;
pub mod tick;
pub mod utf8;

pub use close::CloseCode;
pub use close_handshake::CloseState;
pub use decoder::{Decoder, Event, Limits, Step, Violation};
pub use frame::{write_frame, OpCode, SharedFrame};
pub use session::{Host, ReceiveMode, Received, Role, Session, SessionConfig};
