//! Turning a text prompt into chat messages.

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

/// Chat messages `(role, content)` for a prompt. An HH-style transcript (`"\n\nHuman: …\n\nAssistant: …"`) becomes
/// alternating `user` / `assistant` turns, without the final empty `Assistant:` turn that asks for the reply (text
/// before the first turn becomes a `system` message); any other prompt is one `user` message, verbatim.
pub fn messages_from_prompt(prompt: &str) -> Vec<(String, String)> {
    if !prompt.contains(HUMAN) {
        return vec![("user".into(), prompt.to_string())];
    }
    // Marker positions in order.
    let mut marks: Vec<(usize, &str, &str)> = Vec::new();
    for (marker, role) in [(HUMAN, "user"), (ASSISTANT, "assistant")] {
        marks.extend(prompt.match_indices(marker).map(|(i, _)| (i, marker, role)));
    }
    marks.sort_by_key(|m| m.0);
    let mut out: Vec<(String, String)> = Vec::new();
    let head = prompt[..marks[0].0].trim();
    if !head.is_empty() {
        out.push(("system".into(), head.to_string()));
    }
    for (j, &(at, marker, role)) in marks.iter().enumerate() {
        let end = marks.get(j + 1).map_or(prompt.len(), |m| m.0);
        let content = prompt[at + marker.len()..end].trim();
        let last = j + 1 == marks.len();
        if last && role == "assistant" && content.is_empty() {
            break;
        }
        out.push((role.to_string(), content.to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn hh_transcripts_become_turns() {
        assert_eq!(
            messages_from_prompt("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?\n\nAssistant:"),
            m(&[("user", "hi"), ("assistant", "hello"), ("user", "more?")])
        );
        assert_eq!(
            messages_from_prompt("Be nice.\n\nHuman: hi\n\nAssistant:"),
            m(&[("system", "Be nice."), ("user", "hi")])
        );
        assert_eq!(messages_from_prompt("Say hi."), m(&[("user", "Say hi.")]));
    }
}
