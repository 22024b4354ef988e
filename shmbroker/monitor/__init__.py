"""`shmbroker top`: what a live broker is doing (docs/design/monitor.md)."""
