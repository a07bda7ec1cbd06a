"""Notification channels: sms, telegram, telegram_voice, email, webhook, slack (the voice
channel composes the IVR too, so it lives in api.voice_channel)."""
