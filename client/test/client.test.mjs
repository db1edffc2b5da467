// The client against the real narration example (a child process), over
// real sockets, under faults: a server that drains with 1001 and comes
// back without the history, sockets cut without a close, a connection that
// goes silent, a proxy that refuses WebSocket upgrades.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { createClient, State } from "../index.js";
import { assertWhole, collector, narration, onCleanup, runCleanups, search, startNarration, startProxy, until } from "./support.mjs";

after(runCleanups);

function client(url, options = {}) {
  const c = createClient(url, { WebSocket, minDelay: 50, maxDelay: 500, ...options });
  onCleanup(() => c.close());
  return c;
}

test("a narration streams whole over WebSocket, acknowledged", async () => {
  const { base } = await narration();
  const c = client(`${base}/ws`);
  const got = collector();
  c.subscribe(await search(base), got.options);
  await got.done;
  assertWhole(assert, got);
  assert.equal(c.transport, "websocket");
  assert.equal(got.acks.length, 1);
  assert.equal(got.gaps.length, 0);
});

test("after 1001 it reconnects to the restarted server and reports the lost history as a gap", async () => {
  const { port, server, base } = await narration({ NARRATION_WORD_MS: "100" });
  const c = client(`${base}/ws`);
  const states = [];
  c.onStateChange((state) => states.push(state));
  const got = collector();
  const sub = c.subscribe(await search(base), got.options);
  await until("some deltas", () => got.messages.length >= 5);
  await server.stop("SIGINT");
  await until("the client to notice", () => c.state === State.RECONNECTING);
  const seen = sub.lastSeq;
  const again = await startNarration(port);
  onCleanup(() => again.stop("SIGKILL").catch(() => {}));
  await until("a resubscription", () => got.acks.length === 2);
  assert.equal(got.acks[1].recovered, false, "the new instance has none of it");
  await until("the gap reported", () => got.gaps.length === 1);
  assert.deepEqual(got.gaps[0], { requestId: sub.requestId, lastSeq: seen, firstSeq: 1 });
  assert.deepEqual(states.slice(0, 3), [State.OPEN, State.RECONNECTING, State.OPEN]);
});

test("sockets cut without a close: it resumes with no gap and no duplicate", async () => {
  const { port, base } = await narration({ NARRATION_WORD_MS: "60" });
  const proxy = await startProxy(port);
  onCleanup(() => proxy.close());
  const c = client(`ws://127.0.0.1:${proxy.port}/ws`);
  const got = collector();
  c.subscribe(await search(base), got.options);
  for (const n of [4, 12, 20]) {
    await until(`${n} messages`, () => got.messages.length >= n);
    proxy.cut();
  }
  await got.done;
  assertWhole(assert, got);
  assert.equal(got.gaps.length, 0);
  assert.ok(got.acks.length >= 4, "resubscribed after each cut");
  assert.ok(got.acks.slice(1).every((ack) => ack.recovered === true));
});

test("a connection gone silent is found dead by its pings and replaced", async () => {
  const { port, base } = await narration({ NARRATION_WORD_MS: "60" });
  const proxy = await startProxy(port);
  onCleanup(() => proxy.close());
  const c = client(`ws://127.0.0.1:${proxy.port}/ws`, { pingInterval: 200, pongTimeout: 300 });
  const got = collector();
  c.subscribe(await search(base), got.options);
  await until("some messages", () => got.messages.length >= 5);
  proxy.silence();
  await got.done;
  assertWhole(assert, got);
  assert.ok(got.acks.length >= 2, "a second connection took over");
});

test("with WebSocket refused it falls back to Server-Sent Events, resumes after cuts, and posts actions", async () => {
  const { port, base } = await narration({ NARRATION_WORD_MS: "60" });
  const proxy = await startProxy(port, { refuseUpgrade: true });
  onCleanup(() => proxy.close());
  const c = client(`http://127.0.0.1:${proxy.port}/ws`);
  const got = collector();
  const sub = c.subscribe(await search(base), got.options);
  await until("some messages", () => got.messages.length >= 8);
  assert.equal(c.transport, "sse");
  proxy.cut();
  await got.done;
  assertWhole(assert, got);
  assert.equal(got.gaps.length, 0);
  await c.send({ type: "action_clicked", requestId: sub.requestId, actionId: "call" });
});

test("closed, it rejects what it could not send", async () => {
  const { base } = await narration();
  const c = client(`${base}/ws`, { transports: ["sse"] });
  const pending = c.send({ type: "action_clicked", requestId: "r", actionId: "a" });
  c.close();
  await assert.rejects(pending, /closed/);
  assert.equal(c.state, State.CLOSED);
});
