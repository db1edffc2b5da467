// tower-ws client: one connection to a tower-ws layer, over WebSocket or,
// where that cannot be opened, Server-Sent Events; it reconnects with
// backoff and jitter, resubscribes every topic after the last `seq` it saw,
// drops what a replay repeats, and says when history has a gap.
//
// No dependencies: it needs `WebSocket` (or the `WebSocket` option),
// `fetch` and `ReadableStream`, which browsers and Node 20+ have.

const DEFAULTS = {
  transports: ["websocket", "sse"],
  minDelay: 500,
  maxDelay: 10000,
  pingInterval: 20000,
  pongTimeout: 10000,
  sseTimeout: 75000,
  retryWebSocketAfter: 60000,
};

// Close codes the server uses (RFC 6455 §7.4.1).
const GOING_AWAY = 1001;
const TRY_AGAIN_LATER = 1013;

/** The connection's states, in the order a healthy client goes through. */
export const State = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

export function createClient(url, options = {}) {
  return new Client(url, options);
}

class Subscription {
  constructor(client, requestId, options) {
    this.client = client;
    this.requestId = requestId;
    this.onMessage = options.onMessage ?? (() => {});
    this.onGap = options.onGap ?? (() => {});
    this.onError = options.onError ?? (() => {});
    this.onSubscribed = options.onSubscribed ?? (() => {});
    // The last seq delivered; `since` says what the caller already has.
    this.lastSeq = options.since ?? 0;
    this.active = true;
    this.stream = null; // over SSE: its own event stream
  }

  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this.client._unsubscribe(this);
  }

  /** Takes one topic message: drops repeats, reports gaps, delivers. */
  _take(message) {
    const first = message.seqStart ?? message.seq;
    if (message.seq <= this.lastSeq) return; // replayed again
    if (this.lastSeq > 0 && first > this.lastSeq + 1) {
      // The server announces gaps it knows of; this one it did not (a
      // message dropped for a slow reader under DropNewest).
      this.onGap({ requestId: this.requestId, lastSeq: this.lastSeq, firstSeq: first });
    }
    this.lastSeq = message.seq;
    this.onMessage(message);
  }

  _control(message) {
    if (message.type === "subscribed") {
      this.onSubscribed(message);
    } else if (message.type === "error" && message.error === "history_gap") {
      this.onGap({ requestId: this.requestId, lastSeq: this.lastSeq, firstSeq: message.firstSeq });
      this.lastSeq = Math.max(0, message.firstSeq - 1);
    } else if (message.type === "error") {
      this.onError(message);
    } else {
      this.client._direct(message);
    }
  }
}

class Client {
  constructor(url, options) {
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = this.options.WebSocket ?? globalThis.WebSocket;
    this.fetch = this.options.fetch ?? globalThis.fetch?.bind(globalThis);
    const base = resolve(url);
    this.wsUrl = base.replace(/^http/, "ws");
    this.httpUrl = base.replace(/^ws/, "http");
    this.transports = this.options.transports.filter(
      (t) => (t === "websocket" && this.WebSocket) || (t === "sse" && this.fetch),
    );
    if (this.transports.length === 0) throw new Error("no transport available");
    this.subscriptions = new Map();
    this.listeners = new Set();
    this.outbox = []; // messages waiting for a connection: [message, resolve, reject]
    this.state = State.CONNECTING;
    this.transport = null;
    this.attempt = 0; // failed connection attempts in a row
    this.tried = 0; // transports tried in this round
    this.socket = null;
    this.timer = null;
    this.retryTimer = null;
    // After the caller's own code: listeners it adds next see every change.
    queueMicrotask(() => this._connect());
  }

  /** Calls `listener(state, transport)` on every change; returns a function that stops it. */
  onStateChange(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  subscribe(requestId, options = {}) {
    if (this.state === State.CLOSED) throw new Error("client is closed");
    if (this.subscriptions.has(requestId)) throw new Error(`already subscribed to ${requestId}`);
    const subscription = new Subscription(this, requestId, options);
    this.subscriptions.set(requestId, subscription);
    if (this.transport === "websocket" && this.state === State.OPEN) this._sendSubscribe(subscription);
    if (this.transport === "sse") this._openStream(subscription);
    return subscription;
  }

  /** Sends a client message; resolves once it was handed to the server, queued until then. */
  send(message) {
    if (this.state === State.CLOSED) return Promise.reject(new Error("client is closed"));
    return new Promise((resolve, reject) => {
      this.outbox.push([message, resolve, reject]);
      this._flush();
    });
  }

  close() {
    if (this.state === State.CLOSED) return;
    this._teardown();
    for (const [, , reject] of this.outbox.splice(0)) reject(new Error("client closed"));
    this.subscriptions.clear();
    this._setState(State.CLOSED, null);
  }

  // Connecting, in order of the transports, then again after a backoff.

  _connect() {
    if (this.state === State.CLOSED) return;
    const transport = this.transports[this.tried % this.transports.length];
    if (transport === "websocket") this._openSocket();
    else this._openStreams();
  }

  /** The current attempt failed before it opened: the next transport, or a backoff. */
  _failed(code) {
    if (this.state === State.CLOSED) return;
    this._teardown();
    this.tried += 1;
    if (this.tried % this.transports.length !== 0 && code !== TRY_AGAIN_LATER) {
      this._connect();
      return;
    }
    this._reconnect(code);
  }

  /** An open connection dropped (or a round of attempts failed). */
  _reconnect(code) {
    if (this.state === State.CLOSED) return;
    this._teardown();
    this._setState(State.RECONNECTING, null);
    this.tried = 0;
    const { minDelay, maxDelay } = this.options;
    let delay;
    if (code === GOING_AWAY && this.attempt === 0) {
      // A draining server: go at once, spread a little.
      delay = Math.random() * 100;
    } else {
      const base = code === TRY_AGAIN_LATER ? Math.max(minDelay * 4, 2000) : minDelay;
      const ceiling = Math.min(maxDelay, base * 2 ** this.attempt);
      delay = ceiling / 2 + (Math.random() * ceiling) / 2;
    }
    this.attempt += 1;
    this.timer = setTimeout(() => this._connect(), delay);
  }

  _opened(transport) {
    this.attempt = 0;
    this._setState(State.OPEN, transport);
    if (transport === "sse" && this.transports[0] === "websocket") {
      // Back to WebSocket later: the block may have been a network's.
      clearTimeout(this.retryTimer);
      this.retryTimer = setTimeout(() => {
        if (this.transport !== "sse") return;
        this._teardown();
        this.tried = 0;
        this._connect();
      }, this.options.retryWebSocketAfter);
    }
    this._flush();
  }

  _teardown() {
    clearTimeout(this.timer);
    clearTimeout(this.retryTimer);
    clearInterval(this.watchdog);
    this.timer = this.retryTimer = this.watchdog = null;
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      try {
        socket.close();
      } catch {
        // Closing a socket still connecting throws in some runtimes.
      }
    }
    for (const subscription of this.subscriptions.values()) this._closeStream(subscription);
    this.transport = null;
  }

  _setState(state, transport) {
    const changed = this.state !== state || this.transport !== transport;
    this.state = state;
    this.transport = transport;
    if (changed) for (const listener of [...this.listeners]) listener(state, transport);
  }

  // WebSocket: one socket for every topic.

  _openSocket() {
    let socket;
    try {
      socket = new this.WebSocket(this.wsUrl);
    } catch {
      queueMicrotask(() => this._failed());
      return;
    }
    this.socket = socket;
    let opened = false;
    let lastHeard = Date.now();
    let pingSent = 0;
    socket.onopen = () => {
      opened = true;
      lastHeard = Date.now();
      this.transport = "websocket";
      for (const subscription of this.subscriptions.values()) this._sendSubscribe(subscription);
      this._opened("websocket");
      // Browsers answer the server's pings without telling the page, so
      // the page checks the connection with a message of its own.
      const { pingInterval, pongTimeout } = this.options;
      this.watchdog = setInterval(() => {
        const now = Date.now();
        if (pingSent && now - pingSent > pongTimeout) {
          this._reconnect();
        } else if (!pingSent && now - lastHeard > pingInterval) {
          pingSent = now;
          socket.send('{"type":"ping"}');
        }
      }, Math.max(50, Math.min(pingInterval, pongTimeout) / 4));
    };
    socket.onmessage = (event) => {
      lastHeard = Date.now();
      pingSent = 0;
      this._receive(JSON.parse(event.data));
    };
    socket.onclose = (event) => {
      if (opened) this._reconnect(event.code);
      else this._failed(event.code);
    };
    socket.onerror = () => {};
  }

  _sendSubscribe(subscription) {
    const message = { type: "subscribe", requestId: subscription.requestId };
    if (subscription.lastSeq > 0) message.since = subscription.lastSeq;
    this.socket.send(JSON.stringify(message));
  }

  _receive(message) {
    if (message.type === "pong") return;
    const subscription = this.subscriptions.get(message.requestId);
    if (!subscription) {
      this._direct(message);
    } else if (typeof message.seq === "number") {
      subscription._take(message);
    } else {
      subscription._control(message);
    }
  }

  /** A message to this client rather than to a topic. */
  _direct(message) {
    this.options.onMessage?.(message);
  }

  _unsubscribe(subscription) {
    this.subscriptions.delete(subscription.requestId);
    if (this.transport === "websocket" && this.state === State.OPEN) {
      this.socket.send(JSON.stringify({ type: "unsubscribe", requestId: subscription.requestId }));
    }
    this._closeStream(subscription);
  }

  _flush() {
    if (this.state !== State.OPEN) return;
    if (this.transport === "websocket") {
      // A socket already closing would drop the message without a word.
      if (this.socket?.readyState !== 1) return;
      for (const [message, resolve] of this.outbox.splice(0)) {
        this.socket.send(JSON.stringify(message));
        resolve();
      }
      return;
    }
    // Over SSE a message is posted for a stream: it waits for one.
    const stream = [...this.subscriptions.values()].find((s) => s.stream?.id)?.stream;
    if (!stream) return;
    for (const [message, resolve, reject] of this.outbox.splice(0)) {
      this.fetch(`${this.httpUrl}?stream=${encodeURIComponent(stream.id)}`, {
        method: "POST",
        // text/plain needs no CORS preflight.
        headers: { "content-type": "text/plain;charset=UTF-8" },
        body: JSON.stringify(message),
      }).then((response) => {
        if (response.status === 202) resolve();
        else reject(new Error(`message refused: ${response.status}`));
      }, reject);
    }
  }

  // Server-Sent Events: one stream per topic.

  _openStreams() {
    this.transport = "sse";
    if (this.subscriptions.size === 0) {
      this._opened("sse");
      return;
    }
    for (const subscription of this.subscriptions.values()) this._openStream(subscription);
  }

  _openStream(subscription) {
    const controller = new AbortController();
    const stream = { controller, id: null, opened: false };
    subscription.stream = stream;
    let url = `${this.httpUrl}?requestId=${encodeURIComponent(subscription.requestId)}`;
    if (subscription.lastSeq > 0) url += `&since=${subscription.lastSeq}`;
    let closeCode;
    let lastHeard = Date.now();
    const watchdog = setInterval(() => {
      if (Date.now() - lastHeard > this.options.sseTimeout) controller.abort();
    }, Math.max(50, this.options.sseTimeout / 4));
    const run = async () => {
      const response = await this.fetch(url, {
        headers: { accept: "text/event-stream" },
        signal: controller.signal,
        cache: "no-store",
      });
      if (response.status !== 200) {
        response.body?.cancel().catch(() => {});
        return { refused: response.status };
      }
      stream.opened = true;
      if (this.state !== State.OPEN) this._opened("sse");
      const parser = new EventParser();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return {};
        lastHeard = Date.now();
        for (const event of parser.push(value)) {
          if (event.event === "stream") {
            stream.id = JSON.parse(event.data).streamId;
            this._flush();
          } else if (event.event === "close") {
            closeCode = JSON.parse(event.data).code;
          } else if (event.event === "message" && subscription.active) {
            const message = JSON.parse(event.data);
            if (typeof message.seq === "number") subscription._take(message);
            else subscription._control(message);
          }
        }
      }
    };
    run()
      .catch(() => ({}))
      .then(({ refused }) => {
        clearInterval(watchdog);
        if (subscription.stream !== stream || !subscription.active) return;
        subscription.stream = null;
        if (refused === 400 || refused === 403 || refused === 401) {
          // Not something a retry fixes.
          subscription.onError({ type: "error", requestId: subscription.requestId, error: "refused", status: refused });
          this.subscriptions.delete(subscription.requestId);
          return;
        }
        if (!stream.opened) this._failed(refused === 503 ? TRY_AGAIN_LATER : undefined);
        else this._reconnect(closeCode);
      });
  }

  _closeStream(subscription) {
    const stream = subscription.stream;
    if (!stream) return;
    subscription.stream = null;
    stream.controller.abort();
  }
}

/** An `text/event-stream` parser (WHATWG HTML §9.2.6), fed text as it comes. */
class EventParser {
  constructor() {
    this.buffer = "";
    this.event = "";
    this.data = [];
  }

  *push(text) {
    this.buffer += text;
    let end;
    while ((end = this.buffer.search(/\r\n|\r|\n/)) !== -1) {
      const line = this.buffer.slice(0, end);
      // A lone \r at the end of a chunk may be the start of \r\n.
      if (this.buffer[end] === "\r" && end + 1 === this.buffer.length) break;
      this.buffer = this.buffer.slice(end + (this.buffer.startsWith("\r\n", end) ? 2 : 1));
      if (line === "") {
        if (this.data.length > 0) yield { event: this.event || "message", data: this.data.join("\n") };
        this.event = "";
        this.data = [];
        continue;
      }
      const colon = line.indexOf(":");
      if (colon === 0) continue; // a comment (a heartbeat)
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") this.event = value;
      else if (field === "data") this.data.push(value);
    }
  }
}

/** The layer's URL, absolute: relative ones are taken against the page. */
function resolve(url) {
  if (/^(wss?|https?):\/\//.test(url)) return url;
  if (globalThis.location) return new URL(url, globalThis.location.href).href;
  throw new Error(`an absolute URL is needed outside a browser: ${url}`);
}
