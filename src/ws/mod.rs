//! The WebSocket protocol as sans-IO code: every function here works on
//! byte slices and returns values; nothing touches a socket or a clock.

pub mod close;
pub mod close_handshake;
pub mod decoder;
pub mod deflate;
pub mod extensions;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod utf8;

pub use close::CloseCode;
pub use close_handshake::CloseState;
pub use decoder::{Decoder, Event, Limits, Step, Violation};
pub use frame::{write_frame, OpCode, SharedFrame};
