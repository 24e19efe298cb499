//! Tokens: JWTs from an identity provider, and publishers' own.
//!
//! A client presents a token in its handshake (`Authorization: Bearer`,
//! or `?token=` where a browser cannot set headers) or in an `auth`
//! request on `/ws`. What it may then do comes from the token's claims
//! ([`Grant`]): `sub` is who it is (its chat nick), `channels` the
//! patterns it may subscribe to, `publish` those it may publish to. A
//! token signed by one of the `--publisher-public-key` keys (Ed25519)
//! makes the connection a trusted publisher, as `auth` with a publisher
//! key does, narrowed to its `publish` claim when it has one.
//!
//! * `keys`: the key material, read from its files at start-up and again
//!   on SIGHUP (a file that fails to load keeps the previous keys);
//! * `verify`: one token checked against the keys and the `iss`, `aud`,
//!   `exp` and `nbf` rules, into a [`Grant`] or a [`Refusal`] that says why;
//! * `grants`: each connection's grant and when it expires (the app's
//!   timer closes it with [`TOKEN_EXPIRED`] unless a fresh token came).

mod grants;
mod keys;
mod verify;

pub use grants::{Grants, PublishRight};
pub use keys::{KeyFiles, TokenKeys};
pub use verify::{Grant, Refusal, RefusalKind, TokenRules, TokenVerifier};

use crate::ws::CloseCode;

/// The close code of a connection whose token expired without a fresh
/// one arriving in an `auth` request (reason "token expired"). 4001: an
/// application code (RFC 6455 §7.4.2), so a client can tell it from a
/// 1008 for other policy reasons and fetch a new token before
/// reconnecting.
pub const TOKEN_EXPIRED: CloseCode = CloseCode(4001);
