"""Subjects: what yields the records of the neurons to explain (``base``): a transformers model
recorded with hooks (``transformer``, ``hooks``, ``recording``), rule neurons with known answers
(``synthetic``), or OpenAI's published records (``openai_records``)."""

from neuronlens.lazy import exports

__all__, __getattr__ = exports(__name__, {
    "HookPoint": "hooks",
    "ModelSubject": "transformer",
    "OpenAIRecordsSubject": "openai_records",
    "Recorder": "recording",
    "Recording": "recording",
    "RecordingConfig": "recording",
    "Subject": "base",
    "SyntheticSubject": "synthetic",
})
