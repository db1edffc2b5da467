//! What the Redis backplane stores and sends: key and channel names, the
//! Lua function library, and how its replies and broadcasts are read.
//!
//! A topic `T` under prefix `P` has two keys, the stream `P:{T}:history`
//! and the string `P:{T}:meta`, and one channel, `P:{T}`: the braces make
//! them one hash slot on a Redis Cluster, and spread topics over its
//! shards. (A `T` that begins with `}` or `#` is written with a `#` before
//! it, so that the part in braces is never empty.)
//!
//! Messages of one topic published together are one run: one stream
//! entry, one broadcast. An entry's id is `0-<seq>`, the `seq` of its first
//! message, the next ones following; its fields are `e` (the epoch), `d`
//! (`1` once the stream is finished, for every message of the entry), `n`
//! (how many messages; absent for one) and `b`,
//! the run: a message's JSON object (without `seq`), or for `n > 1` each
//! one's length and `:` before it. The meta string is
//! `<d>:<refreshed>:<epoch>:<node>`: what publishing needs to know,
//! without reading an entry back, when the keys' expiry was last pushed
//! back (ms, the publisher's clock), and the replication id of the Redis
//! that wrote it last. A broadcast on the channel is `<epoch>:<seq>:<d>:`
//! followed by the run, `<epoch>:<seq>+<n>:<d>:` for `n > 1`.

use std::borrow::Cow;

use redis::Value;

use crate::hub::{Fetched, Numbered};
use crate::message::Draft;

/// Messages one run (one stream entry, one broadcast) holds, at most: a
/// history read looks back this far for the entry that holds the first
/// message it wants.
pub(super) const MAX_RUN: usize = 64;

/// The entry id a history read of everything after `seq` begins after:
/// the entry holding `seq + 1` may begin up to a run earlier.
pub(super) fn read_after(seq: u64) -> u64 {
    seq.saturating_sub(MAX_RUN as u64 - 1)
}

/// How many `seq`s back from the last the publish function keeps, so that
/// the last `messages` are kept whole: the entry holding the oldest of
/// them may begin up to a run earlier.
pub(super) fn kept_seqs(messages: usize) -> usize {
    messages + MAX_RUN - 1
}

/// The backplane's two Redis functions, loaded with `FUNCTION LOAD` (Redis
/// keeps functions across restarts with persistence, and replicates them,
/// so a promoted replica has them).
///
/// `publish` numbers, stores and broadcasts runs of messages, in order:
/// one call carries several, as a call costs more than the work of one
/// message, and a run costs about what one message does. `KEYS[2i-1]`,
/// `KEYS[2i]`: the stream and meta key of run `i`. `ARGV`: how many `seq`s
/// back from the last the history keeps (approximately: whole stream nodes
/// are trimmed), history age (ms), grace of a finished stream (ms), the
/// time now (ms), the command that broadcasts (`PUBLISH`, or `SPUBLISH` on
/// a cluster), then for each run its channel, its number of messages, `1`
/// if it finishes the stream, and the run as stored. Returns
/// `{epoch1, first_seq1, epoch2, first_seq2, …}`, a pair per run.
///
/// Redis numbers the entry (`0-*`: the last `seq` plus one), and the
/// stream's last id is moved to the run's last `seq` (`XSETID`). A topic
/// whose meta is gone (expired, or lost by a Redis restart) begins again
/// at 1 under a new epoch taken from the server's clock; so does one whose
/// stream alone was lost, and one last written by another server (under
/// another replication id): a replica promoted after its primary failed
/// may lack the last messages the primary numbered, and numbering them
/// again would give two messages one `seq`. Keys moved here whole by
/// resharding look the same, so a moved topic begins again too. The keys'
/// expiry is pushed back when an eighth of it has passed, not on every
/// message.
///
/// `read` reads a topic's history. `KEYS[1]`: the stream. `ARGV`: the
/// epoch the reader has (or empty), an entry id's `seq`. Returns `{}` if
/// nothing is held, else `{epoch, entries}`: the entries after that id if
/// the epoch is the reader's, else all of them.
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

-- Meta strings taken apart, by their text: a topic's meta changes only
-- when its expiry is pushed back, so most publishes find theirs here.
-- Emptied when it holds 4,096.
local parsed, parsed_count = {}, 0
local function parse(state)
  local p = parsed[state]
  if p then return p end
  local at = string.find(state, ':', 3, true)
  local owner_at = string.find(state, ':', at + 1, true)
  p = {
    done = string.byte(state, 1) == 49,
    refreshed = tonumber(string.sub(state, 3, at - 1)),
    epoch = string.sub(state, at + 1, (owner_at or 0) - 1),
    owner = owner_at and string.sub(state, owner_at + 1),
  }
  if parsed_count == 4096 then parsed, parsed_count = {}, 0 end
  parsed[state] = p
  parsed_count = parsed_count + 1
  return p
end

-- Appends a run as one entry. A run of one has no `n`: the most common
-- entry stays the smallest.
local function append(key, id, epoch, d, count, run)
  if count == '1' then
    return redis.call('XADD', key, id, 'e', epoch, 'd', d, 'b', run)
  end
  return redis.call('XADD', key, id, 'e', epoch, 'd', d, 'n', count, 'b', run)
end

local function publish(KEYS, ARGV)
  local n = #KEYS / 2
  local metas = {}
  for i = 1, n do metas[i] = KEYS[2 * i] end
  local states = redis.call('MGET', unpack(metas))
  local kept, live_ttl, done_ttl, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local here
  -- The meta this call wrote: MGET read them all before the first write.
  local written = {}
  local out = {}
  local at_arg = 6
  for i = 1, n do
    local key, meta = KEYS[2 * i - 1], KEYS[2 * i]
    local channel, count, finishes, run = ARGV[at_arg], ARGV[at_arg + 1], ARGV[at_arg + 2], ARGV[at_arg + 3]
    at_arg = at_arg + 4
    local state = written[meta] or states[i]
    local epoch, was_done, refreshed
    if state then
      local p = parse(state)
      here = here or this_node()
      if p.owner and p.owner ~= here then
        state = nil
      else
        was_done, refreshed, epoch = p.done, p.refreshed, p.epoch
      end
    end
    if not state then redis.call('DEL', key) end
    local done = was_done or finishes == '1'
    local d = done and '1' or '0'
    local id = state and append(key, '0-*', epoch, d, count, run)
    if not state or id == '0-1' then
      if state then redis.call('DEL', key) end
      local t = redis.call('TIME')
      epoch = t[1] .. string.format('%06d', tonumber(t[2]))
      id = append(key, '0-1', epoch, d, count, run)
      state = nil
    end
    -- The broadcast takes the `seq` as Redis wrote it: Lua turns a number
    -- back into text with `sprintf`, which every run of one would pay.
    local first_text = string.sub(id, 3)
    local first = tonumber(first_text)
    local last, seqs = first, first_text
    if count ~= '1' then
      last = first + tonumber(count) - 1
      seqs = first_text .. '+' .. count
      -- The entry's id is its first `seq`; the next entry's must follow
      -- the run's last.
      redis.call('XSETID', key, '0-' .. last)
    end
    -- Trimmed when the run passes a multiple of 64 (a run holds at most
    -- 64), so that every message at most `kept` back from the last is
    -- kept.
    if last % 64 < last - first + 1 and last > kept then
      redis.call('XTRIM', key, 'MINID', '~', '0-' .. (last - kept + 1))
    end
    local ttl = done and done_ttl or live_ttl
    if not state or done ~= was_done or now - refreshed > ttl / 8 then
      here = here or this_node()
      written[meta] = d .. ':' .. now .. ':' .. epoch .. ':' .. here
      redis.call('SET', meta, written[meta], 'PX', ttl)
      redis.call('PEXPIRE', key, ttl)
    end
    redis.call(ARGV[5], channel, epoch .. ':' .. seqs .. ':' .. d .. ':' .. run)
    out[2 * i - 1] = epoch
    out[2 * i] = first
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

/// A broadcast: one run of messages.
pub(super) struct Broadcast<'a> {
    pub(super) epoch: u64,
    /// The first message's `seq`; the others follow.
    pub(super) seq: u64,
    /// Whether the stream is finished, for every message of the run.
    pub(super) done: bool,
    /// The JSON objects, in order.
    pub(super) bodies: Vec<&'a [u8]>,
}

/// Reads a broadcast, `<epoch>:<seq>:<d>:<json>`, or for a run
/// `<epoch>:<seq>+<n>:<d>:` and the run.
pub(super) fn parse_broadcast(payload: &[u8]) -> Option<Broadcast<'_>> {
    let mut parts = payload.splitn(4, |&b| b == b':');
    let epoch = number(parts.next()?)?;
    let seqs = parts.next()?;
    let done = parts.next()? == b"1";
    let run = parts.next()?;
    let (seq, count) = match seqs.iter().position(|&b| b == b'+') {
        Some(plus) => (number(&seqs[..plus])?, number(&seqs[plus + 1..])?),
        None => (number(seqs)?, 1),
    };
    Some(Broadcast {
        epoch,
        seq,
        done,
        bodies: split_run(count, run)?,
    })
}

/// A run as stored and broadcast: the one message's JSON object, or each
/// one's length and `:` before it.
pub(super) fn join_run<'a>(bodies: &[&'a [u8]]) -> Cow<'a, [u8]> {
    if let [body] = bodies {
        return Cow::Borrowed(body);
    }
    let mut run = Vec::new();
    for body in bodies {
        run.extend_from_slice(body.len().to_string().as_bytes());
        run.push(b':');
        run.extend_from_slice(body);
    }
    Cow::Owned(run)
}

/// The JSON objects of a run of `count` messages.
fn split_run(count: u64, mut run: &[u8]) -> Option<Vec<&[u8]>> {
    if count == 1 {
        return Some(vec![run]);
    }
    if count == 0 || count > MAX_RUN as u64 {
        return None;
    }
    let mut bodies = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let colon = run.iter().position(|&b| b == b':')?;
        let len = usize::try_from(number(&run[..colon])?).ok()?;
        bodies.push(run.get(colon + 1..colon + 1 + len)?);
        run = &run[colon + 1 + len..];
    }
    run.is_empty().then_some(bodies)
}

/// Reads the publish function's `{epoch1, first_seq1, …}`: a pair per run.
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
    let mut messages = Vec::with_capacity(entries.len());
    for entry in entries {
        read_entry(entry, epoch, &mut messages)?;
    }
    Some(Fetched {
        epoch: Some(epoch),
        entries: messages,
    })
}

/// Reads one stream entry's messages into `messages`.
fn read_entry(entry: &Value, epoch: u64, messages: &mut Vec<Numbered>) -> Option<()> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let [id, Value::Array(fields)] = parts.as_slice() else {
        return None;
    };
    let first = number(bulk(id)?.strip_prefix(b"0-")?)?;
    let (mut done, mut count, mut run) = (false, 1, None);
    for pair in fields.chunks(2) {
        match (bulk(&pair[0])?, pair.get(1).and_then(bulk)) {
            (b"d", Some(d)) => done = d == b"1",
            (b"n", Some(n)) => count = number(n)?,
            (b"b", Some(b)) => run = Some(b),
            _ => {}
        }
    }
    // Messages that cannot be read are still numbered: the reader skips
    // them with a warning rather than waiting for them.
    let numbered = |seq, draft| Numbered {
        epoch,
        seq,
        done,
        draft,
    };
    match run.and_then(|run| split_run(count, run)) {
        Some(bodies) => messages.extend(
            (first..)
                .zip(bodies)
                .map(|(seq, body)| numbered(seq, Draft::from_body(body))),
        ),
        None => {
            let count = count.min(MAX_RUN as u64);
            messages.extend((first..first + count).map(|seq| numbered(seq, None)));
        }
    }
    Some(())
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
        let b = parse_broadcast(br#"1764100000123456:42:1:{"type":"a:b"}"#).unwrap();
        assert_eq!((b.epoch, b.seq, b.done), (1_764_100_000_123_456, 42, true));
        assert_eq!(b.bodies, [br#"{"type":"a:b"}"#]);
        assert!(parse_broadcast(b"x:1:0:{}").is_none());
        assert!(parse_broadcast(b"1:2:0").is_none());
    }

    #[test]
    fn runs_are_joined_and_split() {
        let bodies: [&[u8]; 3] = [b"{}", br#"{"a":"x:1"}"#, b"{}"];
        let run = join_run(&bodies);
        assert_eq!(&*run, br#"2:{}11:{"a":"x:1"}2:{}"#);
        assert_eq!(split_run(3, &run).unwrap(), bodies);
        assert_eq!(&*join_run(&[b"{}"]), b"{}");
        assert_eq!(split_run(1, b"{}").unwrap(), [b"{}"]);
    }

    #[test]
    fn runs_are_read_back() {
        let b = parse_broadcast(br#"17:5+3:0:2:{}7:{"a":1}2:{}"#).unwrap();
        assert_eq!((b.epoch, b.seq, b.done), (17, 5, false));
        let bodies: Vec<&[u8]> = vec![b"{}", br#"{"a":1}"#, b"{}"];
        assert_eq!(b.bodies, bodies);
        // Lengths that overrun, fall short, or disagree with the count.
        for bad in [
            &br#"17:5+2:0:2:{}9:{"a":1}"#[..],
            br#"17:5+2:0:2:{}6:{"a":1}"#,
            b"17:5+3:0:2:{}2:{}",
            b"17:5+0:0:",
            b"17:5+x:0:2:{}",
            b"17:5+65:0:",
        ] {
            assert!(
                parse_broadcast(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn replies_are_read() {
        let published = Value::Array(vec![bulk("17"), Value::Int(3), bulk("17"), Value::Int(4)]);
        assert_eq!(parse_published(&published), Some(vec![(17, 3), (17, 4)]));
        assert_eq!(parse_published(&Value::Array(vec![bulk("17")])), None);

        // An entry of an earlier version (no `n`), and a run of three.
        let entry = |seq: &str, done: &str, count: Option<&str>, run: &str| {
            let mut fields = vec![bulk("e"), bulk("17"), bulk("d"), bulk(done)];
            if let Some(count) = count {
                fields.extend([bulk("n"), bulk(count)]);
            }
            fields.extend([bulk("b"), bulk(run)]);
            Value::Array(vec![bulk(seq), Value::Array(fields)])
        };
        let fetched = Value::Array(vec![
            bulk("17"),
            Value::Array(vec![
                entry("0-4", "0", None, "{}"),
                entry("0-5", "1", Some("3"), r#"7:{"a":1}7:{"a":2}2:{}"#),
                // Unreadable: numbered still, without a message.
                entry("0-8", "1", Some("2"), r#"7:{"a":1}"#),
            ]),
        ]);
        let f = parse_fetched(&fetched).unwrap();
        assert_eq!(f.epoch, Some(17));
        let seqs: Vec<(u64, bool)> = f.entries.iter().map(|m| (m.seq, m.done)).collect();
        assert_eq!(
            seqs,
            [
                (4, false),
                (5, true),
                (6, true),
                (7, true),
                (8, true),
                (9, true)
            ]
        );
        let readable: Vec<bool> = f.entries.iter().map(|m| m.draft.is_some()).collect();
        assert_eq!(readable, [true, true, true, true, false, false]);
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
