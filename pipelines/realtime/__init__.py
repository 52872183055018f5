"""Speech-to-speech providers: one model hears the caller, thinks and speaks, in place of stt, llm and tts."""
