"""Notification channels: voice, sms, telegram, telegram_voice, email, webhook, slack."""
