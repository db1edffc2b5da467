// Test helpers: the narration example as a child process, a TCP proxy
// that can cut or silence its connections and refuse WebSocket upgrades,
// and waiting without fixed sleeps.
import { spawn } from "node:child_process";
import net from "node:net";
import { fileURLToPath } from "node:url";

export const NARRATION =
  process.env.NARRATION ?? fileURLToPath(new URL("../../target/debug/examples/narration", import.meta.url));

const cleanups = [];

/** Runs `f` when the test file is done (`runCleanups`), last added first. */
export function onCleanup(f) {
  cleanups.push(f);
}

export async function runCleanups() {
  for (const f of cleanups.splice(0).reverse()) await f();
}

/** The narration example on a free port, killed when the file is done. */
export async function narration(env) {
  const port = await freePort();
  const server = await startNarration(port, env);
  onCleanup(() => server.stop("SIGKILL").catch(() => {}));
  return { port, server, base: `http://127.0.0.1:${port}` };
}

export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Waits until `condition()` is truthy; fails after `timeout` ms. */
export async function until(what, condition, timeout = 20000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Starts the narration example on `port`; resolves once it serves. */
export async function startNarration(port, env = {}) {
  const child = spawn(NARRATION, [], {
    env: { ...process.env, PORT: String(port), RUST_LOG: "warn", ...env },
    stdio: ["ignore", "inherit", "inherit"],
  });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  await until("the narration example to serve", async () => {
    try {
      return (await fetch(`http://127.0.0.1:${port}/`)).ok;
    } catch {
      return false;
    }
  });
  return {
    child,
    /** SIGINT: the example shuts the layer down (1001) and exits. */
    async stop(signal = "SIGINT") {
      child.kill(signal);
      await exited;
    },
  };
}

/** Starts a narration on `base`; resolves to its requestId. */
export async function search(base, query = "sushi") {
  const response = await fetch(`${base}/api/search`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ query }),
  });
  return (await response.json()).requestId;
}

/** A TCP proxy to `target` on a port of its own. */
export async function startProxy(targetPort, { refuseUpgrade = false } = {}) {
  const pairs = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(targetPort, "127.0.0.1");
    const pair = { client, upstream, silent: false };
    pairs.add(pair);
    let first = true;
    client.on("data", (chunk) => {
      if (first && refuseUpgrade && /\r\nupgrade:\s*websocket/i.test(chunk.toString("latin1"))) {
        client.end("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        upstream.destroy();
        return;
      }
      first = false;
      if (!pair.silent) upstream.write(chunk);
    });
    upstream.on("data", (chunk) => {
      if (!pair.silent) client.write(chunk);
    });
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("close", end).on("error", end);
    upstream.on("close", end).on("error", end);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: server.address().port,
    /** Cuts every connection without a close: a reset, as a dropped network does. */
    cut() {
      for (const { client, upstream } of pairs) {
        client.resetAndDestroy();
        upstream.destroy();
      }
      pairs.clear();
    },
    /** Stops forwarding on the connections open now, without closing them. */
    silence() {
      for (const pair of pairs) pair.silent = true;
    },
    close() {
      this.cut();
      server.close();
    },
  };
}

/** Collects a subscription's messages until the narration's `status: done`. */
export function collector() {
  const got = { messages: [], gaps: [], acks: [] };
  let finish;
  got.done = new Promise((resolve) => (finish = resolve));
  got.options = {
    onMessage: (m) => {
      got.messages.push(m);
      if (m.type === "status" && m.status === "done") finish();
    },
    onGap: (gap) => got.gaps.push(gap),
    onSubscribed: (ack) => got.acks.push(ack),
  };
  return got;
}

/** Checks the narration arrived whole: each seq once, in order, deltas adding up to fullText. */
export function assertWhole(assert, got) {
  let next = 1;
  for (const m of got.messages) {
    assert.equal(m.seqStart ?? m.seq, next, `seq ${next} next, once`);
    next = m.seq + 1;
  }
  const text = got.messages.filter((m) => m.type === "stream.delta").map((m) => m.text).join("");
  const done = got.messages.find((m) => m.type === "stream.done");
  assert.ok(done, "stream.done arrived");
  assert.equal(text, done.fullText);
}

/** A redis-server of the test's own on a free port, keeping nothing on disk. */
export async function startRedis() {
  const port = await freePort();
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
    stdio: "ignore",
  });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  await until("redis-server to listen", () =>
    new Promise((resolve) => {
      const socket = net.connect(port, "127.0.0.1");
      socket.once("connect", () => {
        socket.destroy();
        resolve(true);
      });
      socket.once("error", () => resolve(false));
    }),
  );
  return {
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      child.kill("SIGKILL");
      await exited;
    },
  };
}
