// The browser client from Node 20+: node --experimental-websocket examples/node-client.mjs [ws-url]
// (Node 22 has WebSocket without the flag.) Subscribes to desk A, publishes one event, prints the ack.
import { DeskBridge } from "../static/deskbridge.js";

const url = process.argv[2] ?? "ws://127.0.0.1:8080/ws";
const bridge = new DeskBridge({ url }); // add `token: () => jwt` when the bridge runs with auth.mode = "jwt"
bridge.on("event", (e) => console.log("event", e.desk, e.event, JSON.stringify(e.data)));
bridge.on("error", (e) => console.error("error", e.code, e.message));
bridge.connect();
await bridge.subscribe(["A"]);
const ack = await bridge.publish("A", "new_example", { bond: "XS0001", px: 101.5 });
console.log("ack", ack.id, ack.routed ? "routed" : "not routed (no desktop queue bound)");
bridge.close();
