/** The connection's states, in the order a healthy client goes through. */
export declare const State: {
  readonly CONNECTING: "connecting";
  readonly OPEN: "open";
  readonly RECONNECTING: "reconnecting";
  readonly CLOSED: "closed";
};
export type ConnectionState = (typeof State)[keyof typeof State];
export type Transport = "websocket" | "sse";

/** A message published to a topic: `seq` numbers it; a merged `stream.delta` covers `seqStart`..`seq`. */
export interface TopicMessage {
  type: string;
  requestId: string;
  seq: number;
  seqStart?: number;
  [field: string]: unknown;
}

/** Messages `lastSeq + 1` to `firstSeq - 1` will never arrive: history no longer holds them. */
export interface Gap {
  requestId: string;
  lastSeq: number;
  firstSeq: number;
}

/** The server's acknowledgement of a subscription. */
export interface Subscribed {
  type: "subscribed";
  requestId: string;
  clientId: number;
  /** The topic's last `seq`; 0 if it has published nothing yet. */
  lastSeq: number;
  /** When resuming: whether everything after `since` is on its way. */
  recovered?: boolean;
}

/** An `error` about this topic (`forbidden`, `too_many_subscriptions`, …), or a refused event stream. */
export interface SubscriptionError {
  type: "error";
  requestId: string;
  error: string;
  message?: string;
  status?: number;
}

export interface SubscribeOptions {
  /** The last `seq` the caller already has; only later messages are delivered. */
  since?: number;
  /** Every topic message once, in `seq` order, across reconnects. */
  onMessage?: (message: TopicMessage) => void;
  onGap?: (gap: Gap) => void;
  onSubscribed?: (ack: Subscribed) => void;
  onError?: (error: SubscriptionError) => void;
}

export interface Subscription {
  readonly requestId: string;
  /** The last `seq` delivered. */
  readonly lastSeq: number;
  unsubscribe(): void;
}

export interface ClientOptions {
  /** A WebSocket constructor, for runtimes without a global one (Node 20: `ws`). */
  WebSocket?: unknown;
  /** Defaults to the global `fetch`; used for Server-Sent Events and posted messages. */
  fetch?: typeof fetch;
  /** Tried in order when connecting. Defaults to `["websocket", "sse"]`. */
  transports?: Transport[];
  /** First reconnect delay in ms, doubled per failure, with jitter. Defaults to 500. */
  minDelay?: number;
  /** Longest reconnect delay in ms. Defaults to 10000. */
  maxDelay?: number;
  /** A WebSocket silent this long (ms) is pinged. Defaults to 20000. */
  pingInterval?: number;
  /** A ping unanswered this long (ms) means the connection is dead. Defaults to 10000. */
  pongTimeout?: number;
  /** An event stream silent this long (ms) is dead; the server writes a heartbeat every 30 s by default. Defaults to 75000. */
  sseTimeout?: number;
  /** On Server-Sent Events, WebSocket is tried again after this long (ms). Defaults to 60000. */
  retryWebSocketAfter?: number;
  /** Messages to this client rather than to a topic (`send_to`). */
  onMessage?: (message: Record<string, unknown>) => void;
}

export interface Client {
  readonly state: ConnectionState;
  /** The transport in use while open, else `null`. */
  readonly transport: Transport | null;
  /** Calls `listener` on every change of state or transport; returns a function that stops it. */
  onStateChange(listener: (state: ConnectionState, transport: Transport | null) => void): () => void;
  subscribe(requestId: string, options?: SubscribeOptions): Subscription;
  /** Resolves once the message was handed to the server; it waits for a connection until then. */
  send(message: Record<string, unknown>): Promise<void>;
  close(): void;
}

/** `url` is the layer's path: `ws://host/ws`, `https://host/ws`, or `/ws` in a page. */
export declare function createClient(url: string, options?: ClientOptions): Client;
