"""``--config`` (a LLaMA-Factory / HF YAML) around a run (:class:`ConfigRewriter`): before every start its
``resume_from_checkpoint`` is set to the chosen checkpoint and its paths are expanded so the framework can open them;
when the run ends the user's own text is put back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..units import one_line
from .context import RunContext, StartPlan
from .prechecks import PrecheckError


class ConfigRewriter:
    """Rewrites ``--config`` before each start and restores it after the run.

    Args:
        ctx: the run's options (``config``, ``layout``, ``resume``), event log and progress output.
        skip_once: logs an invalid checkpoint the first time it is met (the planner's).
    """

    def __init__(self, ctx: RunContext, skip_once: Callable[..., None]):
        self.opts, self.log, self.say = ctx.options, ctx.log, ctx.say
        self._skip_once = skip_once
        self._config_original: str | None = None  # the YAML's text before the first rewrite of this run
        self._config_written: str | None = None  # and the text last written

    def resolve(self, plan: StartPlan) -> int:
        """Point ``--config``'s ``resume_from_checkpoint`` at the chosen checkpoint (or let it search its own
        ``output_dir`` when we found none), and hand what it chose to the job as well.

        Paths are written expanded (``output_dir: ${train_output}`` becomes the path itself): LLaMA-Factory does
        not expand variables, and the supervisor must watch the directory the job really writes to. The user's
        own text is put back by :meth:`restore` when the run ends.

        Args:
            plan: the start's plan; its resume path is set when the YAML's own search found a checkpoint.

        Returns:
            How many invalid checkpoints the YAML's search moved out of the framework's sight.

        Raises:
            PrecheckError: the YAML cannot be rewritten (one line naming the key and the fix).
        """
        # yamlconfig needs ruamel.yaml, an optional extra: imported here, only when --config is used.
        try:
            from ..yamlconfig import resolve_config
        except ImportError as e:
            raise PrecheckError(
                "config",
                f"--config {self.opts.config} needs resumekit.yamlconfig and ruamel.yaml "
                f"({one_line(e)}); pip install 'resumekit[yaml]'",
            ) from None
        kwargs: dict[str, Any] = {"expand": True}
        if self.opts.layout != "auto":
            kwargs["layout"] = self.opts.layout
        if plan.resume_path:
            kwargs["checkpoint"] = plan.resume_path
        elif self.opts.resume == "never":
            kwargs["fresh"] = True
        try:
            result = resolve_config(self.opts.config, **kwargs)  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - any failure to rewrite the YAML stops the start, in one line
            raise PrecheckError("config", f"cannot update --config {self.opts.config}: {one_line(e)}") from None
        if self._config_original is None:
            self._config_original = getattr(result, "original_text", None)
        if getattr(result, "written", False):
            self._config_written = getattr(result, "new_text", None)
        chosen = getattr(result, "checkpoint", None)
        if not plan.resume_path and self.opts.resume != "never" and chosen is not None and chosen.path:
            # Found by the YAML's own search (its output_dir, when --dir points elsewhere).
            plan.resume_path, plan.resume_step = chosen.path, chosen.step
        hidden = getattr(result, "hidden", None) or []
        for h in hidden:
            self.log.emit("hide_invalid", found_by="config", **h)
            self.say(f"moved invalid checkpoint {h.get('path')} out of the framework's sight to {h.get('to')}")
        self.log.emit(
            "config_resolved", config=self.opts.config, resume_from=plan.resume_path or None, result=_jsonable(result)
        )
        for sk in getattr(result, "skipped", None) or []:
            reason = getattr(sk, "reason", "")
            self._skip_once(
                (getattr(sk, "name", ""), reason),
                getattr(sk, "path", "?"),
                reason,
                step=getattr(sk, "step", None),
                path=getattr(sk, "path", None),
                reason=reason,
                found_by="config",
            )
        return len(hidden)

    def restore(self) -> None:
        """Put ``--config`` back as the user wrote it, when this run rewrote it and nobody edited it since: a later
        plain run then neither resumes silently from this run's checkpoint nor loses ``${VAR}`` paths."""
        if not self.opts.config or self._config_original is None or self._config_written is None:
            return
        try:
            from ..yamlconfig import restore_config

            restored = restore_config(self.opts.config, self._config_original, self._config_written)
        except Exception as e:  # noqa: BLE001 - the run is over; say it, do not fail it
            self.log.emit("config_restored", config=self.opts.config, ok=False, error=one_line(e))
            self.say(f"could not put --config {self.opts.config} back as it was: {one_line(e)}")
            return
        self.log.emit("config_restored", config=self.opts.config, ok=restored)
        if restored:
            self.say(f"put --config {self.opts.config} back as it was before the run")
        else:
            self.say(f"left --config {self.opts.config} as it is: it was edited during the run")


def _jsonable(value: Any) -> Any:
    # The YAML resolver's result goes into an event: whatever it is, it must serialise.
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    for attr in ("as_dict", "to_dict", "_asdict"):
        fn = getattr(value, attr, None)
        if callable(fn):
            try:
                return fn()
            except Exception:  # noqa: BLE001
                break
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


__all__ = ["ConfigRewriter"]
