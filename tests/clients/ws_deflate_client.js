// Node `ws` with its default permessage-deflate: prints the negotiated extensions,
// sends one 2 KB message (compressed: over ws's 1 KiB threshold), then prints the first
// two messages it receives, one per line. Usage: node ws_deflate_client.js URL
const WebSocket = require("ws");

const socket = new WebSocket(process.argv[2]);
let received = 0;
socket.on("upgrade", (response) => {
  console.log("extensions " + (response.headers["sec-websocket-extensions"] || ""));
});
socket.on("open", () => socket.send(JSON.stringify({ hello: "x".repeat(2000) })));
socket.on("message", (data) => {
  console.log("message " + JSON.stringify(data.toString()));
  received += 1;
  if (received === 2) {
    socket.close();
  }
});
socket.on("error", (err) => {
  console.error(String(err));
  process.exit(1);
});
