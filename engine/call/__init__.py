"""A call on the media WebSocket, from Twilio's `start` to the finished CallLog.

`media_socket` accepts the stream and builds the call (`setup`); the session runs it, sending audio through
`outbound_audio`, writing turns through `call_log_writer` (which falls back on `call_log_spill` on local disk while
the database is away); `live_calls` lists the calls this process runs."""
