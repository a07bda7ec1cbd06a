"""SIP/RTP voice core: sans-IO SIP state machines, asyncio transports and RTP media."""
