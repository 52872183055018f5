"""The agent's language (BCP 47, `configuration.language`) in each provider's own form, and what each cannot speak.

One home for the rule: `localized` fills a provider's options from the agent's language (a provider's own
`language`/`voice` given in its options wins), `language_instruction` is what a language model is told, and
`language_problems` lists what a configuration asks that its providers cannot do, for the API to refuse at save.
"""

from __future__ import annotations

from typing import TypeVar

from config.agent import (
    AgentConfiguration,
    DeepgramSTTConfig,
    ElevenLabsTTSConfig,
    EspeakTTSConfig,
    OpenAIRealtimeConfig,
    ProviderConfig,
    SphinxSTTConfig,
)
from pipelines.tts.espeak import VOICE_HELP, espeak_catalog

__all__ = [
    "ELEVENLABS_LANGUAGE_CODE_MODELS",
    "ELEVENLABS_MULTILINGUAL_MODELS",
    "SPHINX_LANGUAGES",
    "espeak_voice",
    "language_instruction",
    "language_problems",
    "localized",
    "primary_language",
]

SPHINX_LANGUAGES = frozenset({"en", "en-us"})
"""The languages PocketSphinx has a model for: only US English ships in its wheel."""

ELEVENLABS_LANGUAGE_CODE_MODELS = frozenset({"eleven_flash_v2_5", "eleven_turbo_v2_5"})
"""ElevenLabs models that take a `language_code` to enforce the language."""

ELEVENLABS_MULTILINGUAL_MODELS = ELEVENLABS_LANGUAGE_CODE_MODELS | {"eleven_multilingual_v2", "eleven_v3"}
"""ElevenLabs models that speak other languages than English (the others read every text as English)."""

# Names for the instruction to the model; a language not listed is named by its tag, which models understand too.
_NAMES = {
    "ar": "Arabic",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "fi": "Finnish",
    "fr": "French",
    "he": "Hebrew",
    "hi": "Hindi",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "nl": "Dutch",
    "no": "Norwegian",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "sv": "Swedish",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "zh": "Chinese",
}

_Option = TypeVar("_Option", bound=ProviderConfig)


def primary_language(language: str) -> str:
    """The ISO 639 part of a BCP 47 tag, lower case: "es-MX" → "es"."""
    return language.split("-", 1)[0].lower()


def language_instruction(language: str) -> str:
    """What a language model is told so that it speaks the agent's language ("" for English, the models' own)."""
    primary = primary_language(language)
    if primary == "en":
        return ""
    name = _NAMES.get(primary, language)
    return (
        f"Speak {name} ({language}) for the whole call: every word you say is in {name}, "
        "whatever language these instructions are written in."
    )


def localized(option: _Option, language: str) -> _Option:
    """The provider's options with the agent's language filled in the provider's own form, where not set already."""
    update: dict[str, str | None] = {}
    match option:
        case DeepgramSTTConfig(language=None):
            update["language"] = language  # Deepgram takes BCP 47 as it is ("es", "en-US", "fr-FR")
        case SphinxSTTConfig(language=None):
            update["language"] = language
        case ElevenLabsTTSConfig(language_code=None) if option.model in ELEVENLABS_LANGUAGE_CODE_MODELS:
            update["language_code"] = primary_language(language)
        case EspeakTTSConfig(voice=None):
            update["voice"] = espeak_voice(language) or "en-us"
        case OpenAIRealtimeConfig(language=None):
            update["language"] = primary_language(language)
    return option.model_copy(update=update) if update else option


def language_problems(config: AgentConfiguration) -> list[tuple[str, str]]:
    """(JSON path, message) for each provider of the configuration that cannot work in the agent's language."""
    problems: list[tuple[str, str]] = []
    for stage in ("stt", "tts", "realtime"):
        for index, option in enumerate(getattr(config, stage) or ()):
            language = config.language
            path = f"{stage}[{index}]"
            match option:
                case SphinxSTTConfig():
                    given = option.language or language
                    if given.lower() not in SPHINX_LANGUAGES:
                        field = f"{path}.language" if option.language else "language"
                        problems.append(
                            (field, f"PocketSphinx has no model for {given!r} (only en-US ships); use deepgram")
                        )
                case ElevenLabsTTSConfig() if primary_language(language) != "en":
                    if option.model not in ELEVENLABS_MULTILINGUAL_MODELS:
                        problems.append(
                            (
                                f"{path}.model",
                                f"ElevenLabs model {option.model!r} speaks only English, not {language!r}; use "
                                "eleven_flash_v2_5 or eleven_turbo_v2_5",
                            )
                        )
                case EspeakTTSConfig(voice=None) if espeak_voice(language) is None:
                    problems.append(("language", f"eSpeak NG has no voice for {language!r}"))
                case EspeakTTSConfig(voice=str() as voice) if not espeak_catalog().ships(voice):
                    problems.append((f"{path}.voice", f"eSpeak NG has no voice {voice!r}: {VOICE_HELP}"))
    return problems


def espeak_voice(language: str) -> str | None:
    """The eSpeak NG voice for a BCP 47 language: the tag itself if a voice declares it, else its primary language."""
    declared = espeak_catalog().languages
    for candidate in (language.lower(), primary_language(language)):
        if candidate in declared:
            return candidate
    return None
