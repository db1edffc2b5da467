//! A client message posted for an event stream: read, checked, and handled
//! as the stream's own, as if it had come over a WebSocket.

use std::sync::Arc;

use bytes::Buf;
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::StreamId;
use crate::auth::Principal;
use crate::body::LayerBody;
use crate::connection;
use crate::frame::{self, close_code};
use crate::lock::lock;
use crate::protocol::error_code;
use crate::rate_limit::Verdict;
use crate::shared::Shared;

/// Handles one posted message; answers `202 Accepted` once it was
/// handled (what it causes arrives on the stream).
pub(crate) async fn post<B>(
    shared: Arc<Shared>,
    body: B,
    principal: Option<Principal>,
    to: StreamId,
) -> Response<LayerBody>
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    let Some(stream) = shared.streams.get(to) else {
        return answer(StatusCode::NOT_FOUND, "no such event stream here\n");
    };
    if principal.as_ref().map(Principal::id) != stream.principal.as_ref().map(Principal::id) {
        tracing::warn!(client_id = %to.client_id, "websocket_unauthorized: a post for another principal's stream");
        return answer(StatusCode::FORBIDDEN, "forbidden\n");
    }
    let text = match read(body, shared.config.max_message_size).await {
        Ok(text) => text,
        Err(response) => return response,
    };
    let verdict =
        lock(&stream.rate).check(shared.config.limits.message_rate, stream.opened.elapsed());
    match verdict {
        Verdict::Allowed => {}
        Verdict::Limited => {
            connection::refuse_posted(
                &shared,
                &stream.outbox,
                error_code::RATE_LIMITED,
                "too many messages; this one was not processed",
            );
            return answer(StatusCode::TOO_MANY_REQUESTS, "too many messages\n");
        }
        Verdict::Exceeded => {
            let close = frame::close(close_code::POLICY_VIOLATION, "message rate exceeded");
            stream.outbox.close(Some(close), true);
            return answer(StatusCode::TOO_MANY_REQUESTS, "message rate exceeded\n");
        }
    }
    connection::handle_posted(
        &shared,
        &stream.outbox,
        stream.principal.as_ref(),
        &text,
        &mut lock(&stream.topics),
    );
    answer(StatusCode::ACCEPTED, "")
}

/// The body as text, at most `limit` bytes of it.
async fn read<B>(body: B, limit: usize) -> Result<String, Response<LayerBody>>
where
    B: Body,
{
    let mut body = std::pin::pin!(body);
    let mut bytes = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let Ok(frame) = frame else {
            return Err(answer(
                StatusCode::BAD_REQUEST,
                "the body could not be read\n",
            ));
        };
        if let Ok(mut data) = frame.into_data() {
            if bytes.len() + data.remaining() > limit {
                return Err(answer(StatusCode::PAYLOAD_TOO_LARGE, "message too large\n"));
            }
            while data.has_remaining() {
                let chunk = data.chunk();
                bytes.extend_from_slice(chunk);
                let n = chunk.len();
                data.advance(n);
            }
        }
    }
    String::from_utf8(bytes).map_err(|_| answer(StatusCode::BAD_REQUEST, "the body is not UTF-8\n"))
}

fn answer(status: StatusCode, body: &'static str) -> Response<LayerBody> {
    let mut response = Response::new(LayerBody::from(body));
    *response.status_mut() = status;
    if !body.is_empty() {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    response
}
