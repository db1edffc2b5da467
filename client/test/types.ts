// Compiled (not run) by `npm test`: the declarations describe the API the
// README shows.
import { createClient, State, type ConnectionState, type Gap, type TopicMessage } from "../index.js";

const client = createClient("wss://example.com/ws", { transports: ["websocket", "sse"], maxDelay: 5000 });
const stop: () => void = client.onStateChange((state: ConnectionState, transport) => {
  if (state === State.OPEN && transport === "sse") console.log("streaming over SSE");
});
const subscription = client.subscribe("req-1", {
  since: 3,
  onMessage: (message: TopicMessage) => console.log(message.seq, message.seqStart ?? message.seq),
  onGap: (gap: Gap) => console.log(gap.firstSeq - gap.lastSeq - 1),
  onSubscribed: (ack) => console.log(ack.lastSeq, ack.recovered),
});
const last: number = subscription.lastSeq;
const sent: Promise<void> = client.send({ type: "action_clicked", requestId: "req-1", actionId: "call" });
subscription.unsubscribe();
stop();
client.close();
console.log(last, sent);
