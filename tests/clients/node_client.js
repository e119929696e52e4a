// A Comet client on a stock Node Redis library with its default settings, driven by
// tests/redis_clients.rs: `node node_client.js <config JSON>`.
//
// config: {lib: "ioredis"|"redis", modules: dir holding node_modules, port, conn_id,
// token, auth: "user" (username=conn_id, password=token) | "object" (the token object as
// the only password), protocol: null (the library's default) | 2 | 3, ca: PEM path for
// TLS or null, idle_ms}.
//
// Prints one line per event: "pong" (a PING on the fresh connection), "subscribed",
// "message <data>", "pong-after-unsubscribe", "error <text>" (the library's error events,
// for the test's log), "done". Reads commands from stdin: "unsubscribe", "subscribe",
// "quit". Between the PING and the SUBSCRIBE the connection sits idle for idle_ms, as a
// pooled connection does.
"use strict";
const fs = require("fs");
const path = require("path");
const readline = require("readline");

const config = JSON.parse(process.argv[2]);
const say = (line) => process.stdout.write(line + "\n");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const password =
  config.auth === "object"
    ? JSON.stringify({ conn_id: config.conn_id, token: config.token, info: "node" })
    : config.token;
const username = config.auth === "object" ? undefined : config.conn_id;
const tls = config.ca ? { ca: fs.readFileSync(config.ca), servername: "localhost" } : undefined;
const onMessage = (message) => say("message " + message);

// The two libraries' calls, behind one shape.
function ioredis() {
  const Redis = require(path.join(config.modules, "node_modules", "ioredis"));
  const options = { host: "127.0.0.1", port: config.port, username, password };
  if (config.protocol) options.protocol = config.protocol;
  if (tls) options.tls = tls;
  const client = new Redis(options);
  client.on("error", (err) => say("error " + err.message));
  client.on("message", (_channel, message) => onMessage(message));
  return {
    ready: () => Promise.resolve(),
    ping: () => client.ping(),
    subscribe: () => client.subscribe("inbox"),
    unsubscribe: () => client.unsubscribe("inbox"),
    quit: () => client.quit(),
  };
}

function nodeRedis() {
  const { createClient } = require(path.join(config.modules, "node_modules", "redis"));
  const socket = { host: "127.0.0.1", port: config.port };
  if (tls) Object.assign(socket, { tls: true, ca: tls.ca, servername: "localhost" });
  const options = { socket, username, password };
  if (config.protocol) options.RESP = config.protocol;
  const client = createClient(options);
  client.on("error", (err) => say("error " + err.message));
  return {
    ready: () => client.connect(),
    ping: () => client.ping(),
    subscribe: () => client.subscribe("inbox", onMessage),
    unsubscribe: () => client.unsubscribe("inbox"),
    quit: () => client.quit(),
  };
}

async function main() {
  const client = config.lib === "ioredis" ? ioredis() : nodeRedis();
  await client.ready();
  const pong = await client.ping();
  say("pong " + pong.toString());
  await sleep(config.idle_ms);
  await client.subscribe();
  say("subscribed");
  const commands = readline.createInterface({ input: process.stdin });
  for await (const command of commands) {
    if (command === "unsubscribe") {
      await client.unsubscribe();
      const again = await client.ping();
      say("pong-after-unsubscribe " + again.toString());
    } else if (command === "subscribe") {
      await client.subscribe();
      say("subscribed");
    } else if (command === "quit") {
      await client.quit();
      say("done");
      process.exit(0);
    }
  }
}

main().catch((err) => {
  say("fatal " + (err && err.stack ? err.stack.replace(/\n/g, " | ") : err));
  process.exit(1);
});
