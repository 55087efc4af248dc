"""Chat messages -> one prompt string.

sparselm's models are base models trained on plain text, with no chat format of their own, so chat requests use a
plain-text transcript (the documented default template):

    {system message}            <- only if there is one (system and developer messages, in order)

    User: {message}

    Assistant: {message}

    User: {message}

    Assistant:

and generation stops at ``\\nUser:`` (the model starting the next user turn), which is added to the request's stop
strings. A checkpoint that has a ``chat_template.jinja`` file (or a server started with ``--chat-template FILE``) uses
that Jinja template instead, as Hugging Face tokenizers do: it is rendered with ``messages`` (role and content),
``add_generation_prompt=True``, ``bos_token`` and ``eos_token``, in a sandbox, and adds no stop string.
"""

from __future__ import annotations

from pathlib import Path

from sparselm.errors import InputError

ROLE_NAMES = {"user": "User", "assistant": "Assistant"}
DEFAULT_STOP = ("\nUser:",)


class ChatTemplate:
    def __init__(self, source: str | None = None, bos_token: str = "<s>", eos_token: str = "</s>") -> None:
        self.source = source
        self._template = None
        self.bos_token, self.eos_token = bos_token, eos_token
        if source is not None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            try:
                self._template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
            except TemplateError as exc:
                raise InputError(f"chat template does not parse: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path | None, checkpoint_dir: Path | None = None) -> ChatTemplate:
        """``path`` if given, else the checkpoint's ``chat_template.jinja`` if it has one, else the default."""
        if path is None and checkpoint_dir is not None and (checkpoint_dir / "chat_template.jinja").is_file():
            path = checkpoint_dir / "chat_template.jinja"
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise InputError(f"chat template not found: {path}")
        return cls(path.read_text(encoding="utf-8"))

    @property
    def stop(self) -> tuple[str, ...]:
        return DEFAULT_STOP if self._template is None else ()

    def render(self, messages: list[tuple[str, str]]) -> str:
        """``messages`` as (role, content) pairs -> the prompt text."""
        if self._template is not None:
            from jinja2 import TemplateError

            try:
                return self._template.render(
                    messages=[{"role": r, "content": c} for r, c in messages],
                    add_generation_prompt=True,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
            except TemplateError as exc:
                raise InputError(f"chat template failed on these messages: {exc}") from exc
        system = [c for r, c in messages if r in ("system", "developer")]
        parts = ["\n\n".join(system)] if system else []
        for role, content in messages:
            if role in ROLE_NAMES:
                parts.append(f"{ROLE_NAMES[role]}: {content}")
        parts.append("Assistant:")
        return "\n\n".join(parts)
