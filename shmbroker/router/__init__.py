"""The router: the broker's front door for clients on other hosts (ZeroMQ ROUTER over TCP).
Design: docs/design/router.md; wire format: docs/protocol.md."""
