// The Bun/uWebSockets peer of `comet-bench compare` (issue 12): Bun's built-in
// WebSocket server (uWebSockets) on Comet's client contract, with its pub/sub topics
// doing both broadcast and unicast.
//
// - Clients upgrade on WS_PORT with the `t` token object in the query; the HS256 token is
//   verified as Comet verifies it (signature over header.payload, `sub` == conn_id,
//   `exp` in the future; the header is not parsed, as in the floor).
// - Each client subscribes to the topic `all` and to its own conn_id.
// - The push side is HTTP on RPC_PORT (keep-alive): POST / with a push RPC call as its
//   body, `{"method":"Server.SendToConnections","params":[{"connections":[..],"msg":".."}],"id":n}`
//   or `Server.Broadcast`; the reply body has the shape of Comet's push RPC reply.
// - Pings: Bun's own (sendPings), idleTimeout at its maximum so that no idle client of a
//   run is closed.
//
// Run: SECRET=... WS_PORT=... RPC_PORT=... bun bench/peers/bun-server.js

const secret = process.env.SECRET ?? "";
const wsPort = Number(process.env.WS_PORT);
const rpcPort = Number(process.env.RPC_PORT);

function verify(connId, token) {
  const dot = token.lastIndexOf(".");
  if (dot < 0) return false;
  const input = token.slice(0, dot);
  const mac = new Bun.CryptoHasher("sha256", secret);
  mac.update(input);
  if (mac.digest("base64url") !== token.slice(dot + 1)) return false;
  try {
    const payload = input.slice(input.indexOf(".") + 1);
    const claims = JSON.parse(Buffer.from(payload, "base64url").toString());
    return claims.sub === connId && claims.exp > Date.now() / 1000;
  } catch {
    return false;
  }
}

const clients = Bun.serve({
  port: wsPort,
  hostname: "127.0.0.1",
  fetch(req, server) {
    const t = new URL(req.url).searchParams.get("t");
    let object;
    try {
      object = JSON.parse(t ?? "");
    } catch {
      return new Response("bad t", { status: 400 });
    }
    if (!object || typeof object.conn_id !== "string" || !verify(object.conn_id, String(object.token))) {
      return new Response("token refused", { status: 401 });
    }
    if (server.upgrade(req, { data: { id: object.conn_id } })) return;
    return new Response("upgrade required", { status: 426 });
  },
  websocket: {
    idleTimeout: 960,
    sendPings: true,
    perMessageDeflate: false,
    open(ws) {
      ws.subscribe("all");
      ws.subscribe(ws.data.id);
    },
    message() {},
  },
});

function reply(id, result, error) {
  return new Response(JSON.stringify({ id, result, error }), {
    headers: { "content-type": "application/json" },
  });
}

Bun.serve({
  port: rpcPort,
  hostname: "127.0.0.1",
  async fetch(req) {
    let call;
    try {
      call = await req.json();
    } catch {
      return reply(null, null, "invalid JSON");
    }
    const p = (call.params && call.params[0]) || {};
    switch (String(call.method).replace(/^Server\./, "")) {
      case "SendToConnections": {
        const failed = (p.connections || []).filter((to) => clients.publish(to, p.msg) <= 0);
        return failed.length === 0
          ? reply(call.id, "ok", null)
          : reply(call.id, null, JSON.stringify({ ids: failed, msg: "not connected" }));
      }
      case "Broadcast": {
        clients.publish("all", p.msg);
        const delivered = clients.subscriberCount("all");
        return reply(call.id, { code: 20000, data: { delivered, failed: [] }, error: "" }, null);
      }
      default:
        return reply(call.id, null, `rpc: can't find method ${call.method}`);
    }
  },
});
