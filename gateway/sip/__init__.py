"""Sans-IO SIP layers (transactions, dialogs, digest auth) on top of ``sipmessage``."""
