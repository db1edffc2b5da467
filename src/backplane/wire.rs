//! What the Redis backplane stores and sends: key and channel names, the
//! Lua function library, and how its replies and broadcasts are read.
//!
//! A topic `T` under prefix `P` has two keys, the stream `P:{T}:history`
//! and the string `P:{T}:meta`, and one channel, `P:{T}`: the braces make
//! them one hash slot on a Redis Cluster, and spread topics over its
//! shards. (A `T` that begins with `}` or `#` is written with a `#` before
//! it, so that the part in braces is never empty.) Each stream entry's id
//! is `0-<seq>`; its fields are `e` (the epoch), `d` (`1` once the stream
//! is finished) and `b` (the JSON object, without `seq`). The meta string
//! is `<d>:<refreshed>:<epoch>:<node>`: what publishing needs to know,
//! without reading an entry back, when the keys' expiry was last pushed
//! back (ms, the publisher's clock), and the replication id of the Redis
//! that wrote it last. A broadcast on the channel is `<epoch>:<seq>:<d>:`
//! followed by the JSON object.

use redis::Value;

use crate::hub::{Fetched, Numbered};
use crate::message::Draft;

/// The backplane's two Redis functions, loaded with `FUNCTION LOAD` (Redis
/// keeps functions across restarts with persistence, and replicates them,
/// so a promoted replica has them).
///
/// `publish` numbers and stores messages, then broadcasts each, in order:
/// one call carries several, as a call costs more than the work of one
/// message. `KEYS[2i-1]`, `KEYS[2i]`: the stream and meta key of message
/// `i`. `ARGV`: most messages kept (approximately: whole stream nodes are
/// trimmed), history age (ms), grace of a finished stream (ms), the time
/// now (ms), the command that broadcasts (`PUBLISH`, or `SPUBLISH` on a
/// cluster), then for each message its channel, its JSON object, and `1`
/// if it finishes the stream. Returns `{epoch1, seq1, epoch2, seq2, …}`.
///
/// Redis numbers the entry (`0-*`: the last `seq` plus one). A topic whose
/// meta is gone (expired, or lost by a Redis restart) begins again at 1
/// under a new epoch taken from the server's clock; so does one whose
/// stream alone was lost, and one last written by another server (under
/// another replication id): a replica promoted after its primary failed
/// may lack the last messages the primary numbered, and numbering them
/// again would give two messages one `seq`. Keys moved here whole by
/// resharding look the same, so a moved topic begins again too. The keys'
/// expiry is pushed back when an eighth of it has passed, not on every
/// message.
///
/// `read` reads a topic's history. `KEYS[1]`: the stream. `ARGV`: the
/// epoch the reader has (or empty), the last `seq` it has. Returns `{}` if
/// nothing is held, else `{epoch, entries}`: the entries after that `seq`
/// if the epoch is the reader's, else all of them.
const FUNCTIONS: &str = r"
-- This server's replication id, read again when a tenth of a second old:
-- `INFO` costs as much as numbering several messages. A primary that
-- was demoted and promoted again has a new id; it cannot have numbered
-- anything as a replica, and an automatic failover takes longer than
-- the tenth of a second an old id may be used for.
local node, node_read_at = nil, -1
local function this_node()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if not node or now - node_read_at > 100000 then
    node = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
    node_read_at = now
  end
  return node
end

local function publish(KEYS, ARGV)
  local n = #KEYS / 2
  local metas = {}
  for i = 1, n do metas[i] = KEYS[2 * i] end
  local states = redis.call('MGET', unpack(metas))
  local now = tonumber(ARGV[4])
  local here
  -- The meta this call wrote: MGET read them all before the first write.
  local written = {}
  local out = {}
  for i = 1, n do
    local key, meta = KEYS[2 * i - 1], KEYS[2 * i]
    local channel, body, finishes = ARGV[3 * i + 3], ARGV[3 * i + 4], ARGV[3 * i + 5]
    local state = written[meta] or states[i]
    local epoch, was_done, refreshed
    if state then
      local at = string.find(state, ':', 3, true)
      local owner_at = string.find(state, ':', at + 1, true)
      here = here or this_node()
      if owner_at and string.sub(state, owner_at + 1) ~= here then
        state = nil
      else
        was_done = string.byte(state, 1) == 49
        refreshed = tonumber(string.sub(state, 3, at - 1))
        epoch = string.sub(state, at + 1, (owner_at or 0) - 1)
      end
    end
    if not state then redis.call('DEL', key) end
    local done = was_done or finishes == '1'
    local d = done and '1' or '0'
    local id = state and redis.call('XADD', key, 'MAXLEN', '~', ARGV[1], '0-*', 'e', epoch, 'd', d, 'b', body)
    if not state or id == '0-1' then
      if state then redis.call('DEL', key) end
      local t = redis.call('TIME')
      epoch = t[1] .. string.format('%06d', tonumber(t[2]))
      id = redis.call('XADD', key, 'MAXLEN', '~', ARGV[1], '0-1', 'e', epoch, 'd', d, 'b', body)
      state = nil
    end
    local ttl = tonumber(done and ARGV[3] or ARGV[2])
    if not state or done ~= was_done or now - refreshed > ttl / 8 then
      here = here or this_node()
      written[meta] = d .. ':' .. now .. ':' .. epoch .. ':' .. here
      redis.call('SET', meta, written[meta], 'PX', ttl)
      redis.call('PEXPIRE', key, ttl)
    end
    local s = string.sub(id, 3)
    redis.call(ARGV[5], channel, epoch .. ':' .. s .. ':' .. d .. ':' .. body)
    out[2 * i - 1] = epoch
    out[2 * i] = tonumber(s)
  end
  return out
end

local function read(KEYS, ARGV)
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #last == 0 then return {} end
  local epoch = ''
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then epoch = fields[i + 1] end
  end
  local from = '-'
  if epoch == ARGV[1] then from = '(0-' .. ARGV[2] end
  return {epoch, redis.call('XRANGE', KEYS[1], from, '+')}
end
";

/// The function library as loaded, and its functions' names: all named
/// after a hash of the code, so instances of different versions that
/// share a Redis each call their own.
pub(super) struct Library {
    pub(super) code: String,
    pub(super) publish: String,
    pub(super) read: String,
}

impl Library {
    pub(super) fn new() -> Self {
        let hash = redis::Script::new(FUNCTIONS).get_hash().to_owned();
        let id = &hash[..16];
        let (publish, read) = (
            format!("tower_ws_publish_{id}"),
            format!("tower_ws_read_{id}"),
        );
        let code = format!(
            "#!lua name=tower_ws_{id}\n{FUNCTIONS}\n\
             redis.register_function('{publish}', publish)\n\
             redis.register_function{{function_name = '{read}', callback = read, flags = {{'no-writes'}}}}\n"
        );
        Self {
            code,
            publish,
            read,
        }
    }
}

pub(super) fn stream_key(prefix: &str, topic: &str) -> String {
    format!("{prefix}:{{{}{topic}}}:history", escape(topic))
}

pub(super) fn meta_key(prefix: &str, topic: &str) -> String {
    format!("{prefix}:{{{}{topic}}}:meta", escape(topic))
}

pub(super) fn channel(prefix: &str, topic: &str) -> String {
    format!("{prefix}:{{{}{topic}}}", escape(topic))
}

/// What goes before a topic in braces: Redis Cluster hashes a whole key
/// whose braces hold nothing (`{}`), which would put a topic's keys and
/// channel in different slots.
fn escape(topic: &str) -> &'static str {
    if topic.starts_with(['}', '#']) {
        "#"
    } else {
        ""
    }
}

/// The topic a channel belongs to, if it is under `prefix`.
pub(super) fn topic_of<'a>(prefix: &str, channel: &'a str) -> Option<&'a str> {
    let tagged = channel
        .strip_prefix(prefix)?
        .strip_prefix(":{")?
        .strip_suffix('}')?;
    Some(tagged.strip_prefix('#').unwrap_or(tagged))
}

/// A broadcast's header: epoch, `seq`, whether the stream is finished.
pub(super) struct Header {
    pub(super) epoch: u64,
    pub(super) seq: u64,
    pub(super) done: bool,
}

/// Splits a broadcast, `<epoch>:<seq>:<d>:<json>`, into its header and the
/// JSON object.
pub(super) fn parse_broadcast(payload: &[u8]) -> Option<(Header, &[u8])> {
    let mut parts = payload.splitn(4, |&b| b == b':');
    let epoch = number(parts.next()?)?;
    let seq = number(parts.next()?)?;
    let done = parts.next()? == b"1";
    let body = parts.next()?;
    Some((Header { epoch, seq, done }, body))
}

/// Reads the publish script's `{epoch1, seq1, …}`: one pair per message.
pub(super) fn parse_published(value: &Value) -> Option<Vec<(u64, u64)>> {
    let Value::Array(items) = value else {
        return None;
    };
    items
        .chunks(2)
        .map(|pair| match pair {
            [epoch, Value::Int(seq)] => Some((number(bulk(epoch)?)?, u64::try_from(*seq).ok()?)),
            _ => None,
        })
        .collect()
}

/// Reads the read script's reply.
pub(super) fn parse_fetched(value: &Value) -> Option<Fetched> {
    let Value::Array(items) = value else {
        return None;
    };
    let [epoch, Value::Array(entries)] = items.as_slice() else {
        return items.is_empty().then_some(Fetched {
            epoch: None,
            entries: Vec::new(),
        });
    };
    let epoch = number(bulk(epoch)?)?;
    let entries = entries
        .iter()
        .map(|entry| parse_entry(entry, epoch))
        .collect::<Option<Vec<_>>>()?;
    Some(Fetched {
        epoch: Some(epoch),
        entries,
    })
}

fn parse_entry(entry: &Value, epoch: u64) -> Option<Numbered> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let [id, Value::Array(fields)] = parts.as_slice() else {
        return None;
    };
    let seq = number(bulk(id)?.strip_prefix(b"0-")?)?;
    let (mut done, mut draft) = (false, None);
    for pair in fields.chunks(2) {
        match (bulk(&pair[0])?, pair.get(1).and_then(bulk)) {
            (b"d", Some(d)) => done = d == b"1",
            (b"b", Some(body)) => draft = Draft::from_body(body),
            _ => {}
        }
    }
    Some(Numbered {
        epoch,
        seq,
        done,
        draft,
    })
}

fn bulk(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn number(digits: &[u8]) -> Option<u64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn broadcasts_are_read_back() {
        let (h, body) = parse_broadcast(br#"1764100000123456:42:1:{"type":"a:b"}"#).unwrap();
        assert_eq!((h.epoch, h.seq, h.done), (1_764_100_000_123_456, 42, true));
        assert_eq!(body, br#"{"type":"a:b"}"#);
        assert!(parse_broadcast(b"x:1:0:{}").is_none());
        assert!(parse_broadcast(b"1:2:0").is_none());
    }

    #[test]
    fn replies_are_read() {
        let published = Value::Array(vec![bulk("17"), Value::Int(3), bulk("17"), Value::Int(4)]);
        assert_eq!(parse_published(&published), Some(vec![(17, 3), (17, 4)]));
        assert_eq!(parse_published(&Value::Array(vec![bulk("17")])), None);

        let entry = |seq: &str, body: &str| {
            Value::Array(vec![
                bulk(seq),
                Value::Array(vec![
                    bulk("e"),
                    bulk("17"),
                    bulk("d"),
                    bulk("0"),
                    bulk("b"),
                    bulk(body),
                ]),
            ])
        };
        let fetched = Value::Array(vec![
            bulk("17"),
            Value::Array(vec![entry("0-4", "{}"), entry("0-5", r#"{"a":1}"#)]),
        ]);
        let f = parse_fetched(&fetched).unwrap();
        assert_eq!(f.epoch, Some(17));
        let seqs: Vec<u64> = f.entries.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [4, 5]);
        let empty = parse_fetched(&Value::Array(vec![])).unwrap();
        assert!(empty.epoch.is_none() && empty.entries.is_empty());
    }

    #[test]
    fn channels_map_to_topics() {
        assert_eq!(topic_of("p", &channel("p", "req:1")), Some("req:1"));
        assert_eq!(topic_of("p", &channel("p", "a}b{")), Some("a}b{"));
        assert_eq!(topic_of("p", "q:{req}"), None);
        assert_eq!(topic_of("p", "p:req"), None);
        assert_eq!(stream_key("p", "t"), "p:{t}:history");
        assert_eq!(meta_key("p", "t"), "p:{t}:meta");
        for topic in ["}x", "#", "##}", "a#"] {
            assert_eq!(topic_of("p", &channel("p", topic)), Some(topic));
        }
        assert_eq!(channel("p", "}x"), "p:{#}x}");
        assert_eq!(stream_key("p", "#a"), "p:{##a}:history");
    }
}
