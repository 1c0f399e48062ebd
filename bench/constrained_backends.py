"""The libraries that bench/constrained_decoding.py compares, each behind one small interface.

Every backend offers: probe(schema) (compile without a tokenizer: "" or the error), info(tokenizer,
vocab, eos ids) (the per-tokenizer data), compile(info, schema), matcher(compiled), fill(matchers,
bitmask) (all rows), apply(logits, bitmask), accept(matcher, token) and done(matcher). Each library
is imported only when its backend is made, so the measuring script runs with any subset installed.
"""

from __future__ import annotations

import json
from typing import Any

SEPARATORS = (", ", ": ")  # JSON as json.dumps writes it, no free whitespace (random logits would pick it forever)


def byte_level_tokens(tokenizer: Any) -> dict[bytes, list[int]]:
    """Each non-special token's bytes (GPT-2's byte-to-unicode table, inverted), for outlines-core."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    to_byte = {chr(b): b for b in printable}
    to_byte.update({chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in printable)})
    special = set(tokenizer.all_special_ids)
    out: dict[bytes, list[int]] = {}
    for token, i in tokenizer.get_vocab().items():
        if i not in special:
            out.setdefault(bytes(to_byte[c] for c in token), []).append(i)
    return out



class Llguidance:
    def __init__(self, threads: int = 1, probe: bool = False) -> None:
        import llguidance

        self.llg = llguidance
        self.executor = llguidance.LLExecutor(threads)
        if not probe:  # transformers and torch (torch.compile): not for the probe, and not timed as info
            import llguidance.hf
            import llguidance.torch

            self.kernels = llguidance.torch

    def grammar(self, schema: dict[str, Any]) -> str:
        options = {"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]}
        return self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)

    def probe(self, schema: dict[str, Any]) -> str:
        return self.llg.LLMatcher.validate_grammar(self.grammar(schema))

    def info(self, tokenizer: Any, vocab: int, eos: list[int]) -> Any:
        return self.llg.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)

    def compile(self, info: Any, schema: dict[str, Any]) -> Any:
        matcher = self.llg.LLMatcher(info, self.grammar(schema))
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matchers: list[Any], bitmask: Any) -> None:
        self.kernels.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def apply(self, logits: Any, bitmask: Any) -> None:
        self.kernels.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def done(self, matcher: Any) -> bool:
        return bool(matcher.is_stopped())


class Xgrammar:
    def __init__(self, threads: int = 1, probe: bool = False) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.batch = xgrammar.BatchGrammarMatcher(threads)

    def probe(self, schema: dict[str, Any]) -> str:
        try:
            self.xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)
        except Exception as e:  # noqa: BLE001 - report whatever the library raises
            return str(e).strip()
        return ""

    def info(self, tokenizer: Any, vocab: int, eos: list[int]) -> Any:
        compiler = self.xgr.GrammarCompiler(self.xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab, stop_token_ids=eos), cache_enabled=False)
        return compiler

    def compile(self, info: Any, schema: dict[str, Any]) -> Any:
        return info.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS,
                                        strict_mode=False)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list[Any], bitmask: Any) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def apply(self, logits: Any, bitmask: Any) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def done(self, matcher: Any) -> bool:
        return bool(matcher.is_terminated())


class OutlinesCore:
    def __init__(self, threads: int = 1, probe: bool = False) -> None:
        import outlines_core

        self.oc = outlines_core
        if not probe:
            import outlines_core.kernels.torch

            self.kernels = outlines_core.kernels.torch

    def probe(self, schema: dict[str, Any]) -> str:
        try:
            self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        except Exception as e:  # noqa: BLE001 - report whatever the library raises
            return str(e)
        return ""

    def info(self, tokenizer: Any, vocab: int, eos: list[int]) -> Any:
        return self.oc.Vocabulary(eos[0], byte_level_tokens(tokenizer))

    def compile(self, info: Any, schema: dict[str, Any]) -> Any:
        return self.oc.Index(self.oc.json_schema.build_regex_from_schema(json.dumps(schema)), info)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matchers: list[Any], bitmask: Any) -> None:
        for i, m in enumerate(matchers):
            row = bitmask[i]
            m.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def apply(self, logits: Any, bitmask: Any) -> None:
        self.kernels.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        try:
            matcher.advance(token, False)
        except Exception:  # noqa: BLE001 - a refused token raises
            return False
        return True

    def done(self, matcher: Any) -> bool:
        return bool(matcher.is_finished())


class Genq:
    """genq.workers.runners.constrained itself (llguidance): fill and apply are both in mask_scores,
    so apply_ms is the whole step's masking and fill_ms ~0."""

    def __init__(self, threads: int = 1, probe: bool = False) -> None:
        from genq.shared import response_format

        self.rf, self.rows, self.threads = response_format, [], threads
        if not probe:
            from genq.workers.runners.constrained import ResponseFormats

            self.formats_class = ResponseFormats

    def probe(self, schema: dict[str, Any]) -> str:
        return self.rf.check_response_format(self._format(schema)) or ""

    def _format(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}

    def info(self, tokenizer: Any, vocab: int, eos: list[int]) -> Any:
        return self.formats_class(tokenizer, vocab, eos, cache_size=0, threads=self.threads)  # no cache: all cold

    def compile(self, info: Any, schema: dict[str, Any]) -> Any:
        self.rf._compile.cache_clear()  # the shared grammar cache too
        self.formats = info
        return info.compile(self._format(schema))

    def matcher(self, compiled: Any) -> Any:
        return compiled.matcher()

    def fill(self, matchers: list[Any], bitmask: Any) -> None:
        self.rows = list(enumerate(matchers))

    def apply(self, logits: Any, bitmask: Any) -> None:
        self.formats.mask_scores(logits, self.rows)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept(token))

    def done(self, matcher: Any) -> bool:
        return bool(matcher.finished)


BACKENDS = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines_core": OutlinesCore, "genq": Genq}
