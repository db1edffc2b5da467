// Node's `ws` against the running narration example: post a search,
// subscribe (with permessage-deflate negotiated), receive the whole
// narration, close cleanly. With a second
// address, the search goes to the first instance and the WebSocket to the
// second (instances sharing topics through Redis).
//
// Usage: node narration.mjs http://127.0.0.1:PORT [http://127.0.0.1:OTHER]
import WebSocket from "ws";

const base = process.argv[2];
const wsBase = process.argv[3] ?? base;
const label = process.argv[3] ? "node ws across instances" : "node ws";
const { requestId } = await (await fetch(`${base}/api/search`, {
  method: "POST",
  headers: { "content-type": "application/json" },
  body: JSON.stringify({ query: "ramen" }),
})).json();

const ws = new WebSocket(wsBase.replace("http", "ws") + "/ws");
const result = await new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error("timed out")), 20000);
  let text = "";
  let fullText = null;
  let extensions = "";
  ws.on("open", () => {
    extensions = ws.extensions;
    ws.send(JSON.stringify({ type: "subscribe", requestId }));
  });
  ws.on("message", (data) => {
    const msg = JSON.parse(data.toString());
    if (msg.type === "stream.delta") text += msg.text;
    if (msg.type === "stream.done") fullText = msg.fullText;
    if (msg.type === "status" && msg.status === "done") {
      clearTimeout(timer);
      ws.close(1000, "done");
    }
  });
  ws.on("close", (code) => resolve({ code, text, fullText, extensions }));
  ws.on("error", reject);
});
const deflate = result.extensions.startsWith("permessage-deflate");
const ok = result.code === 1000 && result.fullText !== null && result.text === result.fullText && deflate;
console.log(`${label}: close ${result.code}, ${result.text.length} chars streamed, matches fullText: ${result.text === result.fullText}, extensions: ${JSON.stringify(result.extensions)}`);
console.log(ok ? `${label} check: ok` : `${label} check: FAILED`);
process.exit(ok ? 0 : 1);
