"""Speech-to-text, language-model and text-to-speech providers, and the conversation logic between them."""
