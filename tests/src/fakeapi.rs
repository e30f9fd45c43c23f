//! A fake Anthropic Messages API for the client-shaped end-to-end test:
//! `egress-upstream` serves it under [`crate::egress::FAKE_API_NAME`], and
//! the real Claude Code binary, run with `-p` and `ANTHROPIC_BASE_URL`
//! pointing there, performs one tool call and ends.
//!
//! The reply is canned and decided by the conversation's last user
//! message:
//! - it holds a `tool_result`: a final text message (`end_turn`) that
//!   carries the result, `RESULT ok: <text>` or `RESULT error: <text>`
//!   (the tool's `is_error` flag), so the test sees whether the tool
//!   call succeeded or was refused;
//! - its text has a line `WRITE <absolute path> <content>`: a `tool_use`
//!   of the Write tool with that `file_path` and `content`;
//! - its text has a line `BASH <command>`: a `tool_use` of the Bash tool;
//! - otherwise a final text message `RESULT no marker`.
//!
//! Claude Code sends `POST /v1/messages?beta=true` with `"stream": true`
//! first and repeats the request with `"stream": false` when the streamed
//! one fails, so both forms are answered: server-sent events in the exact
//! Anthropic event sequence, or one JSON message.
//!
//! Everything here is pure (bytes in, bytes out) so that it is unit-tested
//! without sockets; the binary does the I/O.

use std::io::{BufRead, Read};

use serde_json::{json, Value};

/// The largest request body read: Claude Code's first request is about
/// 50 KB (system prompt and tool definitions) and grows with the
/// conversation.
pub const MAX_BODY: usize = 8 << 20;
/// The longest chunk-size line of a chunked body.
const MAX_CHUNK_LINE: usize = 1024;
/// The most of a tool result's text echoed in the final reply.
pub const MAX_ECHO: usize = 4096;
/// The request path (without its query) the fake answers.
pub const MESSAGES_PATH: &str = "/v1/messages";
/// The prompt marker that asks for a Write tool call.
pub const WRITE_MARKER: &str = "WRITE";
/// The prompt marker that asks for a Bash tool call.
pub const BASH_MARKER: &str = "BASH";
/// How the final reply starts when the tool call succeeded.
pub const RESULT_OK: &str = "RESULT ok";
/// How the final reply starts when the tool call failed or was refused.
pub const RESULT_ERROR: &str = "RESULT error";
/// The final reply to a prompt without a marker.
pub const RESULT_NO_MARKER: &str = "RESULT no marker";

/// The `-p` prompt that makes the fake ask for a write of `content` (one
/// line, no line break) to the absolute `path` (no whitespace).
pub fn write_prompt(path: &str, content: &str) -> String {
    format!("{WRITE_MARKER} {path} {content}")
}

/// The `-p` prompt that makes the fake ask for a Bash run of `command`
/// (one line).
pub fn bash_prompt(command: &str) -> String {
    format!("{BASH_MARKER} {command}")
}

/// The tool call a prompt asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolCall {
    Write { file_path: String, content: String },
    Bash { command: String },
}

impl ToolCall {
    fn name(&self) -> &'static str {
        match self {
            ToolCall::Write { .. } => "Write",
            ToolCall::Bash { .. } => "Bash",
        }
    }

    fn input(&self) -> Value {
        match self {
            ToolCall::Write { file_path, content } => {
                json!({"file_path": file_path, "content": content})
            }
            ToolCall::Bash { command } => {
                json!({"command": command, "description": "Run the fake API's command"})
            }
        }
    }
}

/// The assistant's turn the fake answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    /// A `tool_use` block; `stop_reason` `tool_use`.
    Tool(ToolCall),
    /// A text block; `stop_reason` `end_turn`.
    Final(String),
}

/// An error reply, in the API's error shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub reason: &'static str,
    /// The API's error type, e.g. `invalid_request_error`.
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            reason: "Bad Request",
            kind: "invalid_request_error",
            message: message.into(),
        }
    }

    fn too_large(message: impl Into<String>) -> Self {
        ApiError {
            status: 413,
            reason: "Payload Too Large",
            kind: "request_too_large",
            message: message.into(),
        }
    }

    /// The reply body: `{"type":"error","error":{"type":..,"message":..}}`.
    pub fn body(&self) -> String {
        json!({"type": "error", "error": {"type": self.kind, "message": self.message}}).to_string()
    }
}

/// How a request's body is framed, from its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length: N`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// A `Content-Length` that is not a number, two that differ, or a
    /// transfer coding other than chunked.
    Invalid,
}

/// Reads a body framed as `framing`, at most [`MAX_BODY`] bytes. A body
/// that announces more is refused before any of it is read (413); one
/// that is cut off or badly chunked is a 400.
pub fn read_body(r: &mut impl BufRead, framing: Framing) -> Result<Vec<u8>, ApiError> {
    match framing {
        Framing::Empty => Ok(Vec::new()),
        Framing::Invalid => Err(ApiError::bad_request("bad body framing")),
        Framing::Length(n) => {
            if n > MAX_BODY as u64 {
                return Err(ApiError::too_large(format!(
                    "the body is {n} bytes, more than {MAX_BODY}"
                )));
            }
            let mut body = Vec::with_capacity(n as usize);
            r.take(n)
                .read_to_end(&mut body)
                .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
            if body.len() as u64 != n {
                return Err(ApiError::bad_request("the body was cut off"));
            }
            Ok(body)
        }
        Framing::Chunked => read_chunked(r),
    }
}

fn read_line(r: &mut impl BufRead) -> Result<String, ApiError> {
    let mut line = Vec::new();
    r.take(MAX_CHUNK_LINE as u64)
        .read_until(b'\n', &mut line)
        .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
    if !line.ends_with(b"\n") {
        return Err(ApiError::bad_request("a chunk line is cut off or too long"));
    }
    String::from_utf8(line)
        .map(|l| l.trim_end_matches(['\r', '\n']).to_owned())
        .map_err(|_| ApiError::bad_request("a chunk line is not text"))
}

fn read_chunked(r: &mut impl BufRead) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    loop {
        let line = read_line(r)?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| ApiError::bad_request(format!("bad chunk size {size:?}")))?;
        if size == 0 {
            // Trailers, up to the blank line.
            while !read_line(r)?.is_empty() {}
            return Ok(body);
        }
        if body.len() as u64 + size > MAX_BODY as u64 {
            return Err(ApiError::too_large(format!(
                "the chunked body is more than {MAX_BODY} bytes"
            )));
        }
        let before = body.len();
        r.take(size)
            .read_to_end(&mut body)
            .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if (body.len() - before) as u64 != size {
            return Err(ApiError::bad_request("a chunk was cut off"));
        }
        if !read_line(r)?.is_empty() {
            return Err(ApiError::bad_request("a chunk does not end with CRLF"));
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub model: String,
    pub stream: bool,
    pub turn: Turn,
}

/// Parses a Messages request and decides the turn (see the module's
/// documentation).
pub fn exchange(body: &[u8]) -> Result<Exchange, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad_request("messages: an array is required"))?;
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-fake")
        .to_owned();
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    Ok(Exchange {
        model,
        stream,
        turn: decide(messages),
    })
}

/// The content blocks of a message (a string content is one text block).
fn blocks(message: &Value) -> Vec<Value> {
    match message.get("content") {
        Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    }
}

/// The text of a `tool_result`'s content: a string, or text blocks.
fn result_text(block: &Value) -> String {
    match block.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn is_user(m: &Value) -> bool {
    m.get("role").and_then(Value::as_str) == Some("user")
}

/// The marker lines in a message's text blocks, in order.
fn markers_in(message: &Value) -> Vec<ToolCall> {
    blocks(message)
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .flat_map(|t| t.lines().filter_map(parse_marker).collect::<Vec<_>>())
        .collect()
}

/// `RESULT ok: <text>` or `RESULT error: <text>` for a `tool_result` block.
fn result_line(block: &Value) -> String {
    let is_error = block
        .get("is_error")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let text = result_text(block);
    let head = if is_error { RESULT_ERROR } else { RESULT_OK };
    format!("{head}: {}", truncate(&text, MAX_ECHO))
}

/// Decides the turn. The prompt is the latest user message whose text
/// holds marker lines (messages of other roles, such as the `system`
/// entries Claude Code puts among them, are skipped); each of its markers
/// becomes one tool call, in order, one per turn, and once every call has
/// its `tool_result` the final answer has one `RESULT` line per call. So
/// one run can make several writes (one allowed, one refused). Without a
/// prompt, a `tool_result` in the last user message still gets its line.
pub fn decide(messages: &[Value]) -> Turn {
    let tool_results = |ms: &[Value]| -> Vec<Value> {
        ms.iter()
            .filter(|m| is_user(m))
            .flat_map(blocks)
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            .collect()
    };
    let prompt = messages
        .iter()
        .rposition(|m| is_user(m) && !markers_in(m).is_empty());
    let Some(i) = prompt else {
        let last = messages.iter().rev().find(|m| is_user(m));
        return Turn::Final(
            last.and_then(|m| tool_results(std::slice::from_ref(m)).pop())
                .map_or_else(|| RESULT_NO_MARKER.to_owned(), |b| result_line(&b)),
        );
    };
    let calls = markers_in(&messages[i]);
    let results = tool_results(&messages[i + 1..]);
    match calls.get(results.len()) {
        Some(call) => Turn::Tool(call.clone()),
        None => Turn::Final(
            results
                .iter()
                .map(result_line)
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    }
}

/// The first marker line in `text`: `WRITE <absolute path> <content>` or
/// `BASH <command>`.
pub fn find_marker(text: &str) -> Option<ToolCall> {
    text.lines().find_map(parse_marker)
}

/// One line as a marker, if it is one.
fn parse_marker(line: &str) -> Option<ToolCall> {
    let line = line.trim();
    let (word, rest) = line.split_once(char::is_whitespace)?;
    let rest = rest.trim();
    match word {
        WRITE_MARKER => {
            let (path, content) = rest.split_once(char::is_whitespace)?;
            let content = content.trim();
            (path.starts_with('/') && !content.is_empty()).then(|| ToolCall::Write {
                file_path: path.to_owned(),
                content: content.to_owned(),
            })
        }
        BASH_MARKER if !rest.is_empty() => Some(ToolCall::Bash {
            command: rest.to_owned(),
        }),
        _ => None,
    }
}

/// The `usage` object of a reply; the counts are nominal.
fn usage() -> Value {
    json!({"input_tokens": 1, "output_tokens": 1,
           "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
}

fn stop_reason(turn: &Turn) -> &'static str {
    match turn {
        Turn::Tool(_) => "tool_use",
        Turn::Final(_) => "end_turn",
    }
}

fn content_block(turn: &Turn, id: &str) -> Value {
    match turn {
        Turn::Tool(call) => json!({"type": "tool_use", "id": format!("toolu_{id}"),
                                   "name": call.name(), "input": call.input()}),
        Turn::Final(text) => json!({"type": "text", "text": text}),
    }
}

/// The non-streamed reply: one message object.
pub fn render_json(model: &str, id: &str, turn: &Turn) -> String {
    json!({
        "id": format!("msg_{id}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [content_block(turn, id)],
        "stop_reason": stop_reason(turn),
        "stop_sequence": null,
        "usage": usage(),
    })
    .to_string()
}

fn event(out: &mut String, data: Value) {
    let name = data["type"].as_str().unwrap_or("ping").to_owned();
    out.push_str(&format!("event: {name}\ndata: {data}\n\n"));
}

/// The streamed reply: `message_start`, `content_block_start`, one
/// `content_block_delta` (`input_json_delta` or `text_delta`),
/// `content_block_stop`, `message_delta` with the stop reason,
/// `message_stop`.
pub fn render_sse(model: &str, id: &str, turn: &Turn) -> String {
    let mut out = String::new();
    event(
        &mut out,
        json!({"type": "message_start", "message": {
            "id": format!("msg_{id}"), "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": usage()}}),
    );
    let (start, delta) = match turn {
        Turn::Tool(call) => (
            json!({"type": "tool_use", "id": format!("toolu_{id}"), "name": call.name(),
                   "input": {}}),
            json!({"type": "input_json_delta", "partial_json": call.input().to_string()}),
        ),
        Turn::Final(text) => (
            json!({"type": "text", "text": ""}),
            json!({"type": "text_delta", "text": text}),
        ),
    };
    event(
        &mut out,
        json!({"type": "content_block_start", "index": 0, "content_block": start}),
    );
    event(
        &mut out,
        json!({"type": "content_block_delta", "index": 0, "delta": delta}),
    );
    event(&mut out, json!({"type": "content_block_stop", "index": 0}));
    event(
        &mut out,
        json!({"type": "message_delta",
               "delta": {"stop_reason": stop_reason(turn), "stop_sequence": null},
               "usage": {"output_tokens": 1}}),
    );
    event(&mut out, json!({"type": "message_stop"}));
    out
}

/// A reply to `POST /v1/messages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub reason: &'static str,
    pub content_type: &'static str,
    pub body: String,
    /// For the request log: `stream=<bool> tool_use=<name>`,
    /// `end_turn=<first words>` or `error=<status>`.
    pub summary: String,
}

/// Answers one Messages request whose body was read as `body`; `id`
/// makes the message and tool-use ids.
pub fn reply(body: Result<Vec<u8>, ApiError>, id: &str) -> Reply {
    let x = match body.and_then(|b| exchange(&b)) {
        Ok(x) => x,
        Err(e) => {
            return Reply {
                status: e.status,
                reason: e.reason,
                content_type: "application/json",
                body: e.body(),
                summary: format!("error={} {}", e.status, e.message),
            }
        }
    };
    let what = match &x.turn {
        Turn::Tool(call) => format!("tool_use={}", call.name()),
        Turn::Final(text) => format!(
            "end_turn={:?}",
            truncate(text.lines().next().unwrap_or(""), 80)
        ),
    };
    let (content_type, body) = if x.stream {
        ("text/event-stream", render_sse(&x.model, id, &x.turn))
    } else {
        ("application/json", render_json(&x.model, id, &x.turn))
    };
    Reply {
        status: 200,
        reason: "OK",
        content_type,
        body,
        summary: format!("stream={} {what}", x.stream),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(stream: bool, messages: Value) -> Vec<u8> {
        json!({"model": "claude-test", "stream": stream, "messages": messages,
               "max_tokens": 10})
        .to_string()
        .into_bytes()
    }

    /// The shape Claude Code 2.1.332 sends: a system reminder and the
    /// prompt as text blocks, then a `system` entry among the messages.
    fn first_turn(prompt: &str) -> Value {
        json!([
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>\nWRITE nothing here\n</system-reminder>\n"},
                {"type": "text", "text": prompt}]},
            {"role": "system", "content": [{"type": "text", "text": "WRITE /etc/passwd x"}]}
        ])
    }

    fn second_turn(prompt: &str, result: Value) -> Value {
        let mut m = first_turn(prompt).as_array().unwrap().clone();
        m.push(json!({"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "Write", "input": {}}]}));
        m.push(json!({"role": "user", "content": [result]}));
        Value::Array(m)
    }

    #[test]
    fn markers_parse() {
        assert_eq!(
            find_marker(&write_prompt("/tmp/x/out.txt", "hello world")),
            Some(ToolCall::Write {
                file_path: "/tmp/x/out.txt".into(),
                content: "hello world".into()
            })
        );
        assert_eq!(
            find_marker("please\n  WRITE /a/b hi  \nthanks"),
            Some(ToolCall::Write {
                file_path: "/a/b".into(),
                content: "hi".into()
            })
        );
        assert_eq!(
            find_marker(&bash_prompt("curl -sS https://denied.test/")),
            Some(ToolCall::Bash {
                command: "curl -sS https://denied.test/".into()
            })
        );
        // A relative path, a missing content, a marker word inside a line,
        // lower case, nothing after BASH: no marker.
        for no in [
            "WRITE rel/path x",
            "WRITE /abs",
            "WRITE /abs   ",
            "please WRITE /a b",
            "write /a b",
            "BASH   ",
            "WRITE",
            "",
        ] {
            assert_eq!(find_marker(no), None, "{no:?}");
        }
    }

    #[test]
    fn the_turn_follows_the_last_user_message() {
        let x = exchange(&request(true, first_turn("WRITE /tmp/o.txt hello"))).unwrap();
        assert_eq!(
            x,
            Exchange {
                model: "claude-test".into(),
                stream: true,
                turn: Turn::Tool(ToolCall::Write {
                    file_path: "/tmp/o.txt".into(),
                    content: "hello".into()
                })
            }
        );
        let ok = json!({"type": "tool_result", "tool_use_id": "toolu_1",
                        "content": "File created successfully at: /tmp/o.txt"});
        let x = exchange(&request(false, second_turn("WRITE /tmp/o.txt hello", ok))).unwrap();
        assert!(!x.stream);
        assert_eq!(
            x.turn,
            Turn::Final("RESULT ok: File created successfully at: /tmp/o.txt".into())
        );
        let err = json!({"type": "tool_result", "tool_use_id": "toolu_1", "is_error": true,
                         "content": [{"type": "text", "text": "EACCES: permission denied"}]});
        let x = exchange(&request(true, second_turn("WRITE /ro/o.txt hello", err))).unwrap();
        assert_eq!(
            x.turn,
            Turn::Final("RESULT error: EACCES: permission denied".into())
        );
        // A resumed conversation: an old tool result, then a new prompt.
        let mut m = second_turn(
            "WRITE /a x",
            json!({"type": "tool_result", "content": "ok"}),
        )
        .as_array()
        .unwrap()
        .clone();
        m.push(json!({"role": "assistant", "content": [{"type": "text", "text": "done"}]}));
        m.push(json!({"role": "user", "content": "WRITE /b y"}));
        assert_eq!(
            decide(&m),
            Turn::Tool(ToolCall::Write {
                file_path: "/b".into(),
                content: "y".into()
            })
        );
        assert_eq!(
            decide(&[json!({"role": "user", "content": "hi"})]),
            Turn::Final(RESULT_NO_MARKER.into())
        );
        assert_eq!(decide(&[]), Turn::Final(RESULT_NO_MARKER.into()));
        // A long tool result is cut in the echo, on a character boundary.
        let long = json!({"type": "tool_result", "content": "é".repeat(MAX_ECHO)});
        let Turn::Final(t) = decide(second_turn("x", long).as_array().unwrap()) else {
            panic!("not final");
        };
        assert!(t.len() <= RESULT_OK.len() + 2 + MAX_ECHO, "{}", t.len());
    }

    #[test]
    fn several_markers_are_one_call_each_then_one_line_each() {
        let prompt = format!(
            "{}\n{}",
            write_prompt("/o/a.txt", "one"),
            write_prompt("/ro/b.txt", "two")
        );
        let mut m = first_turn(&prompt).as_array().unwrap().clone();
        assert_eq!(
            decide(&m),
            Turn::Tool(ToolCall::Write {
                file_path: "/o/a.txt".into(),
                content: "one".into()
            })
        );
        m.push(json!({"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "Write", "input": {}}]}));
        m.push(json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "created a"}]}));
        assert_eq!(
            decide(&m),
            Turn::Tool(ToolCall::Write {
                file_path: "/ro/b.txt".into(),
                content: "two".into()
            })
        );
        m.push(json!({"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_2", "name": "Write", "input": {}}]}));
        m.push(json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true,
             "content": "EROFS: read-only file system"}]}));
        assert_eq!(
            decide(&m),
            Turn::Final("RESULT ok: created a\nRESULT error: EROFS: read-only file system".into())
        );
    }

    #[test]
    fn malformed_requests_are_400() {
        for body in [&b"{not json"[..], b"[]", b"{\"messages\": 3}", b""] {
            let r = reply(Ok(body.to_vec()), "1");
            assert_eq!(r.status, 400, "{body:?}");
            let v: Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], "invalid_request_error");
        }
    }

    #[test]
    fn the_json_reply_is_a_message() {
        let turn = Turn::Tool(ToolCall::Write {
            file_path: "/o".into(),
            content: "hi".into(),
        });
        let v: Value = serde_json::from_str(&render_json("m", "7", &turn)).unwrap();
        assert_eq!(v["id"], "msg_7");
        assert_eq!(v["type"], "message");
        assert_eq!(v["role"], "assistant");
        assert_eq!(v["model"], "m");
        assert_eq!(v["stop_reason"], "tool_use");
        assert_eq!(
            v["content"],
            json!([{"type": "tool_use", "id": "toolu_7", "name": "Write",
                    "input": {"file_path": "/o", "content": "hi"}}])
        );
        let v: Value =
            serde_json::from_str(&render_json("m", "8", &Turn::Final("RESULT ok: x".into())))
                .unwrap();
        assert_eq!(v["stop_reason"], "end_turn");
        assert_eq!(
            v["content"],
            json!([{"type": "text", "text": "RESULT ok: x"}])
        );
    }

    /// The events of an SSE body as (event name, data).
    fn events(body: &str) -> Vec<(String, Value)> {
        assert!(body.ends_with("\n\n"));
        body.trim_end()
            .split("\n\n")
            .map(|e| {
                let (ev, data) = e.split_once('\n').unwrap();
                let name = ev.strip_prefix("event: ").unwrap().to_owned();
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(data["type"], name.as_str());
                (name, data)
            })
            .collect()
    }

    #[test]
    fn the_stream_is_the_anthropic_event_sequence() {
        let turn = Turn::Tool(ToolCall::Bash {
            command: "echo \"hi\"".into(),
        });
        let ev = events(&render_sse("m", "3", &turn));
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(ev[0].1["message"]["id"], "msg_3");
        assert_eq!(ev[0].1["message"]["content"], json!([]));
        assert_eq!(ev[0].1["message"]["stop_reason"], Value::Null);
        assert_eq!(
            ev[1].1["content_block"],
            json!({"type": "tool_use", "id": "toolu_3", "name": "Bash", "input": {}})
        );
        assert_eq!(ev[2].1["delta"]["type"], "input_json_delta");
        // The partial JSON, joined, is the tool's input.
        let input: Value =
            serde_json::from_str(ev[2].1["delta"]["partial_json"].as_str().unwrap()).unwrap();
        assert_eq!(input["command"], "echo \"hi\"");
        assert_eq!(ev[4].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(ev[1].1["index"], 0);
        assert_eq!(ev[3].1["index"], 0);

        let ev = events(&render_sse(
            "m",
            "4",
            &Turn::Final("RESULT ok: a\nb".into()),
        ));
        assert_eq!(
            ev[1].1["content_block"],
            json!({"type": "text", "text": ""})
        );
        assert_eq!(
            ev[2].1["delta"],
            json!({"type": "text_delta", "text": "RESULT ok: a\nb"})
        );
        assert_eq!(ev[4].1["delta"]["stop_reason"], "end_turn");
    }

    #[test]
    fn reply_picks_the_form_the_request_asks_for() {
        let r = reply(Ok(request(true, first_turn("WRITE /o hi"))), "1");
        assert_eq!((r.status, r.content_type), (200, "text/event-stream"));
        assert_eq!(r.summary, "stream=true tool_use=Write");
        let r = reply(Ok(request(false, first_turn("hi"))), "1");
        assert_eq!((r.status, r.content_type), (200, "application/json"));
        assert_eq!(r.summary, "stream=false end_turn=\"RESULT no marker\"");
    }

    #[test]
    fn bodies_are_bounded() {
        let mut small = &b"{\"a\":1}rest"[..];
        assert_eq!(
            read_body(&mut small, Framing::Length(7)).unwrap(),
            b"{\"a\":1}"
        );
        assert_eq!(small, b"rest");
        // Announced too large: refused before reading.
        let e = read_body(&mut &b""[..], Framing::Length(MAX_BODY as u64 + 1)).unwrap_err();
        assert_eq!(e.status, 413);
        let r = reply(Err(e), "1");
        assert_eq!(r.status, 413);
        assert!(r.summary.starts_with("error=413"), "{}", r.summary);
        assert_eq!(
            read_body(&mut &b"abc"[..], Framing::Length(5))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            read_body(&mut &b"x"[..], Framing::Invalid)
                .unwrap_err()
                .status,
            400
        );
        assert!(read_body(&mut &b"x"[..], Framing::Empty)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn chunked_bodies_decode_and_are_bounded() {
        let mut r = &b"4\r\n{\"a\"\r\n3;ext=1\r\n:1}\r\n0\r\nTrailer: x\r\n\r\nnext"[..];
        assert_eq!(read_body(&mut r, Framing::Chunked).unwrap(), b"{\"a\":1}");
        assert_eq!(r, b"next");
        // More than MAX_BODY in total, in chunks each within it.
        let chunk = MAX_BODY / 2 + 1;
        let mut big = Vec::new();
        for _ in 0..2 {
            big.extend_from_slice(format!("{chunk:x}\r\n").as_bytes());
            big.extend(std::iter::repeat_n(b'a', chunk));
            big.extend_from_slice(b"\r\n");
        }
        big.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(
            read_body(&mut &big[..], Framing::Chunked)
                .unwrap_err()
                .status,
            413
        );
        // One chunk announcing a huge size: refused before reading.
        assert_eq!(
            read_body(&mut &b"ffffffffffff\r\n"[..], Framing::Chunked)
                .unwrap_err()
                .status,
            413
        );
        for bad in [
            &b"zz\r\nab\r\n0\r\n\r\n"[..],
            b"2\r\nabX\r\n0\r\n\r\n",
            b"5\r\nab",
            b"2\r\nab\r\n",
            b"",
        ] {
            assert_eq!(
                read_body(&mut &bad[..], Framing::Chunked)
                    .unwrap_err()
                    .status,
                400,
                "{bad:?}"
            );
        }
        let long_line = format!("{}\r\n", "0".repeat(MAX_CHUNK_LINE + 10));
        assert_eq!(
            read_body(&mut long_line.as_bytes(), Framing::Chunked)
                .unwrap_err()
                .status,
            400
        );
    }
}
