"""Audio and the Twilio Media Streams protocol, with no network I/O."""
