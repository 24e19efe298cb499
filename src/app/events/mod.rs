//! The `events` channel's registration streams: `/ws` clients that send
//! `register` get every published event matching their filters as the flat
//! JSON object the publisher sent ([`stream`]), filtered by [`filter`].
//! Kept apart from [`super::channels`] because these clients speak the
//! original event service's protocol, not the channel protocol.

pub mod filter;
pub mod stream;
