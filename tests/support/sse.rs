//! A Server-Sent Events client over a raw socket: the request, the
//! chunked body, and the events as the spec (WHATWG HTML §9.2) parses
//! them. Comments are returned too, so heartbeats can be seen.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::TIMEOUT;

/// One event, or one comment line.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `event:`, `None` for a plain message.
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
    /// A comment line (`: …`), with no other field.
    pub comment: Option<String>,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("data is JSON")
    }
}

pub struct EventStream {
    reader: BufReader<TcpStream>,
    /// Bytes of the body not yet parsed into lines.
    body: Vec<u8>,
    /// Left of the current chunk.
    chunk_left: usize,
    ended: bool,
}

/// `GET /ws?<query>` with `Accept: text/event-stream` and `extra` header
/// lines; `Err((status, text))` when it is not a `200`.
pub async fn open(
    addr: SocketAddr,
    query: &str,
    extra: &str,
) -> Result<EventStream, (u16, String)> {
    open_on(TcpStream::connect(addr).await.unwrap(), query, extra).await
}

pub async fn open_on(
    mut socket: TcpStream,
    query: &str,
    extra: &str,
) -> Result<EventStream, (u16, String)> {
    let request = format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n{extra}\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(socket);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(TIMEOUT, reader.read_line(&mut line))
            .await
            .expect("response in time")
            .unwrap();
        if n == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    if status != 200 {
        return Err((status, head));
    }
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    Ok(EventStream {
        reader,
        body: Vec::new(),
        chunk_left: 0,
        ended: false,
    })
}

impl EventStream {
    /// The next event or comment; `None` once the body ended. Panics
    /// after TIMEOUT.
    pub async fn next(&mut self) -> Option<Event> {
        tokio::time::timeout(TIMEOUT, self.next_event())
            .await
            .expect("an event in time")
    }

    /// The next event that is not a comment.
    pub async fn next_event_skipping_comments(&mut self) -> Option<Event> {
        loop {
            match self.next().await {
                Some(e) if e.comment.is_some() => continue,
                other => return other,
            }
        }
    }

    async fn next_event(&mut self) -> Option<Event> {
        let mut event = Event {
            event: None,
            id: None,
            data: String::new(),
            comment: None,
        };
        let mut has_data = false;
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                if has_data || event.event.is_some() {
                    return Some(event);
                }
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "" => {
                    return Some(Event {
                        comment: Some(value.to_owned()),
                        ..event
                    })
                }
                "event" => event.event = Some(value.to_owned()),
                "id" => event.id = Some(value.to_owned()),
                "data" => {
                    if has_data {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                    has_data = true;
                }
                _ => {}
            }
        }
    }

    /// One line of the body, without its `\n`; `None` at the end.
    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.body.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.body.drain(..=at).collect();
                return Some(String::from_utf8(line[..at].to_vec()).unwrap());
            }
            if self.ended {
                return None;
            }
            self.read_chunk().await;
        }
    }

    /// Reads more of the chunked body.
    async fn read_chunk(&mut self) {
        if self.chunk_left == 0 {
            let mut size = String::new();
            if self.reader.read_line(&mut size).await.unwrap_or(0) == 0 {
                self.ended = true;
                return;
            }
            let size = size.trim();
            if size.is_empty() {
                // The CRLF after the previous chunk.
                return;
            }
            self.chunk_left = usize::from_str_radix(size, 16).unwrap();
            if self.chunk_left == 0 {
                self.ended = true;
                return;
            }
        }
        let mut buf = vec![0u8; self.chunk_left.min(8192)];
        let n = self.reader.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            self.ended = true;
            return;
        }
        self.body.extend_from_slice(&buf[..n]);
        self.chunk_left -= n;
    }

    /// Reads events until one that is neither a comment nor the `stream`
    /// naming; returns the stream's id along the way if one came.
    pub async fn skip_preamble(&mut self) -> (String, Value) {
        let named = self
            .next_event_skipping_comments()
            .await
            .expect("the stream event");
        assert_eq!(named.event.as_deref(), Some("stream"));
        let stream_id = named.json()["streamId"].as_str().unwrap().to_owned();
        let ack = self
            .next_event_skipping_comments()
            .await
            .expect("the subscribed event");
        let ack = ack.json();
        assert_eq!(ack["type"], "subscribed", "{ack}");
        (stream_id, ack)
    }
}

/// `POST /ws?stream=<id>` with `body`; the status.
pub async fn post(addr: SocketAddr, stream_id: &str, body: &str, extra: &str) -> u16 {
    let request = format!(
        "POST /ws?stream={stream_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    super::raw_http(addr, &request).await.0
}

impl EventStream {
    /// The socket, to hold without reading.
    pub fn into_socket(self) -> TcpStream {
        self.reader.into_inner()
    }
}
