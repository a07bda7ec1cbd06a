"""RTP media: G.711, paced sending, reception and DTMF detection."""
