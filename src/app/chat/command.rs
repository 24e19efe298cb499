//! The plain-text chat language of `/chat`: a line is either something to
//! say or a `/command`.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatInput<'a> {
    Say(&'a str),
    Me(&'a str),
    Nick(&'a str),
    Join(&'a str),
    Leave,
    Rooms,
    Who,
    Help,
    /// A `/word` that is not a command, or a command missing its argument.
    Invalid(&'static str),
    Unknown(&'a str),
}

pub const HELP: &str = "commands: /nick NAME, /join ROOM, /leave, /rooms, /who, /me ACTION, /help; anything else is said to your room";

/// Parses one line (already stripped of its line ending).
pub fn parse_line(line: &str) -> ChatInput<'_> {
    let Some(command_line) = line.strip_prefix('/') else {
        return ChatInput::Say(line);
    };
    // "//text" says "/text", for lines that really start with a slash.
    if command_line.starts_with('/') {
        return ChatInput::Say(command_line);
    }
    let (command, argument) = match command_line.split_once(char::is_whitespace) {
        Some((c, a)) => (c, a.trim()),
        None => (command_line, ""),
    };
    match (command.to_ascii_lowercase().as_str(), argument) {
        ("nick", "") => ChatInput::Invalid("usage: /nick NAME"),
        ("nick", name) => ChatInput::Nick(name),
        ("join", "") => ChatInput::Invalid("usage: /join ROOM"),
        ("join", room) => ChatInput::Join(room.trim_start_matches('#')),
        ("me", "") => ChatInput::Invalid("usage: /me ACTION"),
        ("me", action) => ChatInput::Me(action),
        ("leave" | "part", _) => ChatInput::Leave,
        ("rooms" | "list", _) => ChatInput::Rooms,
        ("who" | "names", _) => ChatInput::Who,
        ("help" | "?", _) => ChatInput::Help,
        _ => ChatInput::Unknown(command),
    }
}

/// Nicks: 1-24 characters of letters, digits, `_` and `-`.
pub fn valid_nick(nick: &str) -> bool {
    (1..=24).contains(&nick.len())
        && nick
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Rooms: 1-32 characters of lowercase letters, digits, `_` and `-`.
pub fn valid_room(room: &str) -> bool {
    (1..=32).contains(&room.len())
        && room
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_commands() {
        assert_eq!(parse_line("hello there"), ChatInput::Say("hello there"));
        assert_eq!(parse_line("//slash"), ChatInput::Say("/slash"));
        assert_eq!(parse_line("/nick  alice "), ChatInput::Nick("alice"));
        assert_eq!(parse_line("/nick"), ChatInput::Invalid("usage: /nick NAME"));
        assert_eq!(parse_line("/JOIN #dev"), ChatInput::Join("dev"));
        assert_eq!(parse_line("/me waves"), ChatInput::Me("waves"));
        assert_eq!(parse_line("/leave"), ChatInput::Leave);
        assert_eq!(parse_line("/rooms"), ChatInput::Rooms);
        assert_eq!(parse_line("/who"), ChatInput::Who);
        assert_eq!(parse_line("/help"), ChatInput::Help);
        assert_eq!(parse_line("/dance now"), ChatInput::Unknown("dance"));
    }

    #[test]
    fn names() {
        assert!(
            valid_nick("alice_1-b")
                && !valid_nick("")
                && !valid_nick("a b")
                && !valid_nick(&"a".repeat(25))
        );
        assert!(
            valid_room("lobby")
                && valid_room("dev-ops_2")
                && !valid_room("Lobby")
                && !valid_room("")
                && !valid_room("a.b")
        );
    }
}
