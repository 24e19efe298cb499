//! The `/chat` plain-text client (made for `websocat`): its greeting, how
//! a message is split into lines, and each line said or run as a
//! `/command` ([`super::command`]). Problems are answered with a `! `
//! line; nothing here disconnects. Kept apart from the rooms themselves
//! ([`super::Chat`]), which JSON clients on `/ws` share.

use super::command::{parse_line, ChatInput, HELP};
use super::nicks::NickChange;
use super::presence::{who_line, WhoRequest};
use super::{
    conflict, has_control_characters, not_in_a_room, rooms_line, tell, Chat, ChatFormat, LineKind,
    DEFAULT_ROOM,
};
use crate::app::protocol::{ErrorCode, ProtocolError};
use crate::app::{ConnId, Message, Outbox};

impl Chat {
    /// A `/chat` client connected: greet it and put it in the lobby.
    pub fn on_plain_open(&mut self, conn: ConnId, out: &mut impl Outbox) {
        let nick = self.ensure_member(conn, ChatFormat::Plain).nick.clone();
        let greeting = format!(
            "* welcome to fanout chat: you are {nick} in [{DEFAULT_ROOM}]. Type to talk; {HELP}"
        );
        out.reply(conn, Message::Text(&greeting));
        // The lobby always exists, so joining it cannot fail.
        let _ = self.join(conn, DEFAULT_ROOM, &None, out, |_| String::new());
    }

    /// One `/chat` message: each line is said or run as a command. Problems
    /// are answered with a `! ` line; nothing here disconnects.
    pub fn on_plain_message(&mut self, conn: ConnId, message: Message<'_>, out: &mut impl Outbox) {
        let Message::Text(text) = message else {
            return tell(out, conn, "! binary messages are not chat: send text lines");
        };
        let lines: Vec<&str> = text
            .split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .collect();
        // A trailing newline (websocat sends one per line) is not an empty line.
        let lines = match lines.split_last() {
            Some((last, rest)) if last.is_empty() && !rest.is_empty() => rest,
            _ => &lines[..],
        };
        for line in lines {
            self.plain_line(conn, line, out);
        }
    }

    fn plain_line(&mut self, conn: ConnId, line: &str, out: &mut impl Outbox) {
        if line.trim().is_empty() {
            return tell(out, conn, "! empty line: type something to say, or /help");
        }
        if line.len() > self.max_line {
            return tell(
                out,
                conn,
                &format!(
                    "! line too long: {} bytes, at most {}",
                    line.len(),
                    self.max_line
                ),
            );
        }
        if has_control_characters(line) {
            return tell(
                out,
                conn,
                "! control characters (escape sequences, carriage returns) are not allowed",
            );
        }
        let current_room = self
            .members
            .get(&conn)
            .and_then(|m| m.rooms.first().cloned());
        let result = match parse_line(line) {
            ChatInput::Say(text) => {
                self.say_here(conn, current_room.as_deref(), text, LineKind::Say, out)
            }
            ChatInput::Me(text) => {
                self.say_here(conn, current_room.as_deref(), text, LineKind::Me, out)
            }
            ChatInput::Nick(nick) => match self.presence.is_some() {
                // Scale-out: Redis decides; the answer comes later.
                true => self.check_rename(conn, nick).map(|()| {
                    if let Some(presence) = self.presence.as_mut() {
                        presence.nicks.push(NickChange::Claim {
                            conn,
                            nick: nick.to_owned(),
                            asked: true,
                        });
                    }
                }),
                false => self.rename(conn, nick, out).map(|_| ()),
            },
            ChatInput::Join(room) => {
                if current_room.as_deref() == Some(room) {
                    Err(conflict(format!("you are already in [{room}]")))
                } else {
                    let joined = self.join(conn, room, &None, out, |_| String::new());
                    if joined.is_ok() {
                        if let Some(old) = current_room {
                            self.leave(conn, &old, out);
                        }
                    }
                    joined.map(|_| ())
                }
            }
            ChatInput::Leave => match current_room {
                Some(room) => {
                    self.leave(conn, &room, out);
                    tell(
                        out,
                        conn,
                        &format!("* you left [{room}]; /join ROOM to talk again"),
                    );
                    Ok(())
                }
                None => Err(not_in_a_room()),
            },
            ChatInput::Rooms => {
                match self.presence.as_mut() {
                    Some(presence) => presence.rooms.push(conn),
                    None => tell(out, conn, &rooms_line(&self.room_counts(), false)),
                }
                Ok(())
            }
            ChatInput::Who => match current_room {
                Some(room) => {
                    match self.presence.as_mut() {
                        Some(presence) => presence.who.push(WhoRequest { conn, room }),
                        None => tell(out, conn, &who_line(&room, &self.who(&room), false)),
                    }
                    Ok(())
                }
                None => Err(not_in_a_room()),
            },
            ChatInput::Help => {
                tell(out, conn, &format!("* {HELP}"));
                Ok(())
            }
            ChatInput::Invalid(usage) => Err(ProtocolError::new(ErrorCode::BadRequest, usage)),
            ChatInput::Unknown(command) => Err(ProtocolError::new(
                ErrorCode::UnknownType,
                format!("unknown command /{command}; /help lists them"),
            )),
        };
        if let Err(error) = result {
            tell(out, conn, &format!("! {}", error.message));
        }
    }

    fn say_here(
        &mut self,
        conn: ConnId,
        room: Option<&str>,
        text: &str,
        kind: LineKind,
        out: &mut impl Outbox,
    ) -> Result<(), ProtocolError> {
        match room {
            Some(room) => self.say(conn, room, text, kind, out),
            None => Err(ProtocolError::new(
                ErrorCode::NotFound,
                "you are not in a room: /join ROOM",
            )),
        }
    }
}
