"""Text-to-speech prompts rendered to 8 kHz mono PCM and cached on disk."""

from prompts.audio import TELEPHONY_RATE, WavFormatError, pcm_to_wav, to_telephony_pcm, wav_to_pcm
from prompts.cache import Prompt, PromptCache
from prompts.espeak import EspeakEngine
from prompts.tts import TtsEngine, TtsError, engine_names, get_engine, register_engine

__all__ = [
    "TELEPHONY_RATE",
    "EspeakEngine",
    "Prompt",
    "PromptCache",
    "TtsEngine",
    "TtsError",
    "WavFormatError",
    "engine_names",
    "get_engine",
    "pcm_to_wav",
    "register_engine",
    "to_telephony_pcm",
    "wav_to_pcm",
]
