"""The engine: add requests, step, read outputs. One step = schedule -> run -> update.

Not thread-safe: one thread drives it (the server runs it in its own thread).
"""

from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from fulmine import kernels
from fulmine.config import ConfigError, EngineConfig
from fulmine.engine.admission import Admission, Streams
from fulmine.engine.calibration import calibrate
from fulmine.engine.embeddings import Done, EmbeddingJob, Embeddings
from fulmine.engine.invariants import check_invariants
from fulmine.engine.invariants import enabled as invariants_enabled
from fulmine.engine.limits import RequestLimits
from fulmine.engine.memory import return_freed_memory
from fulmine.engine.output_processor import OutputProcessor
from fulmine.engine.outputs import RequestOutput
from fulmine.engine.ranks import start_ranks
from fulmine.engine.scheduler import Scheduler, draft_room
from fulmine.executors.cost_model import StepCostModel, StepShape
from fulmine.executors.model_runner import ModelRunner
from fulmine.kv_cache import KVCacheManager
from fulmine.kv_cache.sizing import fit_max_model_len, kv_cache_blocks, kv_cache_bytes_per_token, kv_cache_dtype
from fulmine.layers.linear import Embedding, Linear
from fulmine.models.loader import load_model
from fulmine.models.source import resolve
from fulmine.reasoning import detect as detect_reasoning
from fulmine.request import SLO, FinishReason, Request, SamplingParams
from fulmine.sampling.grammar import Grammars, TokenMasks
from fulmine.speculative.draft import DraftModelProposer
from fulmine.speculative.governor import Governor
from fulmine.tokenizer import Message, encode_prompt, load_tokenizer, use_template

logger = logging.getLogger("fulmine.engine")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Phases:
    """Where loading's time goes, as one log line: each phase's seconds in the order they ended (the
    tokenizer's on its own thread, beside the weights)."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self.last = now - self.last, now

    def timed(self, name: str, work: Any, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return work(*args)
        finally:
            self.seconds[name] = time.perf_counter() - started

    def log(self, model: str) -> float:
        total = time.perf_counter() - self.started
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.seconds.items())
        logger.info("%s ready in %.2f s: %s", model, total, parts)
        return total


class LLMEngine(RequestLimits):
    def __init__(self, model: str | None = None, config: EngineConfig | None = None, progress: bool = True) -> None:
        config = config or EngineConfig()
        self.config = config
        phases = _Phases()
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        )
        dtype = _DTYPES.get(config.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        weight_dtype = _DTYPES.get(config.weight_dtype) or (torch.float16 if device.type == "cpu" else dtype)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.num_threads = torch.get_num_threads()  # the cores it computes on (the kernels' pool)
        kernels.set_threads(self.num_threads)
        self.source = resolve(model)
        phases.done("reading the file")
        model_config = self.source.config
        self.model_config = model_config
        kv_dtype = kv_cache_dtype(config, device, dtype, weight_dtype)
        bytes_per_token = kv_cache_bytes_per_token(model_config, kv_dtype)
        self.max_model_len = fit_max_model_len(config, model_config, bytes_per_token, device)
        if self.max_model_len > model_config.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's context window "
                f"({model_config.max_position_embeddings})"
            )
        num_blocks = kv_cache_blocks(config, bytes_per_token, self.max_model_len, device)
        load_args = dict(
            device=device, dtype=dtype, weight_dtype=weight_dtype, quantization=config.quantization,
            exact_kernels=config.exact_kernels,
        )  # fmt: skip
        runner_args = dict(
            num_blocks=num_blocks, block_size=config.block_size, max_model_len=self.max_model_len, device=device,
            dtype=dtype, seed=config.seed, exact_kernels=config.exact_kernels, executor=config.executor,
            max_num_seqs=config.max_num_seqs, kv_dtype=kv_dtype,
        )  # fmt: skip
        # tensor parallel: the other ranks start loading their parts now (engine/ranks.py)
        tp_size = config.tensor_parallel_size
        self.ranks = start_ranks(config, model, model_config, load_args, runner_args) if tp_size > 1 else None
        # The tokenizer loads on a thread while weights load (its C work beside theirs).
        with ThreadPoolExecutor(max_workers=1) as pool:
            tokenizer = pool.submit(phases.timed, "tokenizer", load_tokenizer, self.source, progress)
            tp = self.ranks.tp if self.ranks is not None else None
            model_module = load_model(self.source, progress=progress, tp=tp, **load_args)  # type: ignore[arg-type]
            phases.done("weights")
            self.tokenizer = tokenizer.result()
            phases.done("waiting for the tokenizer")
        if config.chat_template is not None:
            use_template(self.tokenizer, config.chat_template)
        eos = set(model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_token_ids = tuple(sorted(eos))
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        # what a step costs: one model for the governor, the prefill limit, admission and `fulmine plan`
        self.cost = StepCostModel()
        self.governor = None
        if config.speculative == "ngram":
            self.governor = Governor(config.num_speculative_tokens, cost=self.cost)
        elif config.speculative == "draft":
            assert config.draft_model is not None
            proposer = DraftModelProposer(
                config.draft_model, config, model_config.vocab_size, self.max_model_len, device, dtype, weight_dtype
            )
            self.governor = Governor(config.num_speculative_tokens, proposer, cost=self.cost)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens)
        default_slo = SLO(config.slo_ttft_ms or None, config.slo_itl_ms or None)
        self.admission = Admission(self.cost, config.max_num_batched_tokens, config.max_itl_ms, default_slo)
        self.runner = ModelRunner(model_module, **runner_args)  # type: ignore[arg-type]
        self.embeddings = Embeddings(self.runner, self.kv_cache)
        if self.ranks is not None:
            self.runner.tell = self.ranks.tell
        self.grammars = Grammars(self.tokenizer, model_config.vocab_size, self.eos_token_ids)
        self.reasoning = detect_reasoning(self.tokenizer, config.reasoning_parser)
        self.outputs = OutputProcessor(self.tokenizer, self.grammars, self.eos_token_ids, self.reasoning)
        self.mask_seconds = 0.0  # time spent computing token masks, for /metrics
        self._ids = itertools.count()
        self.check_invariants = invariants_enabled()  # after every step (the test suite turns it on)
        phases.done("runner and caches")
        self.prefetch = kernels.DEFAULT_PREFETCH  # the kernels' prefetch distance: calibration measures it
        phases.done("calibration (cached)" if calibrate(self) else "calibration")
        return_freed_memory()  # what loading parsed and dropped (the tokenizer's JSON) leaves the heap
        self.load_seconds = phases.log(self.source.name)

    # -- requests ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int] | list[Message]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.model_config.vocab_size)

    def add_request(
        self,
        prompt: str | list[int] | list[Message],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        generated: list[int] | None = None,
    ) -> str:
        """Check a request (ConfigError if it cannot run as asked) and add it: the in-process front door.
        `generated`: tokens this request already produced elsewhere (a replica that died mid-stream,
        replicas/front.py); it goes on after them as if it had drawn them here: a seeded draw
        depends on the index of the token drawn, so the continuation is the same."""
        params, generated = params or SamplingParams(), generated or []
        prompt_ids = self.encode_prompt(prompt)
        self.check_request(prompt_ids + generated, params)
        return self.add_checked(prompt_ids, params, request_id, arrival_time, generated)

    def add_checked(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
        generated: list[int] | None = None,
    ) -> str:
        """Add a request its front door checked (check_request: the server before it submits, or
        add_request): what the checks promise is asserted here, not checked again."""
        generated = generated or []
        assert prompt_ids and len(prompt_ids) + len(generated) < self.max_model_len, "an unchecked request"
        request_id = request_id or f"req-{next(self._ids)}"
        request = Request(request_id, prompt_ids, params, self.eos_token_ids, self.max_model_len)
        request.output_token_ids = list(generated)
        request.arrival_time = request.arrival_time if arrival_time is None else arrival_time
        if not self.admission.is_admitted(request_id):  # (the server admits before it submits)
            self.admit(request_id, prompt_ids + generated, params, request.arrival_time)
        request.deadline = self.admission.added(request_id)
        try:
            self.outputs.add(request, generated)
            self.scheduler.add_request(request)
        except Exception:
            self.admission.forget(request_id)
            self.outputs.forget(request_id)
            raise
        return request_id

    def admit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival_time: float) -> None:
        """Admit a request by its latency targets or raise admission.Refused (thread-safe: the server
        admits on its own thread, so that a refusal does not wait for a step to end)."""
        cached = len(self.kv_cache.peek_prefix(prompt_ids)) * self.kv_cache.block_size
        slo = self.admission.targets(params.slo)
        streams = Streams.of(list(self.scheduler.running))
        budget = self.admission.admit(request_id, len(prompt_ids) - cached, slo, arrival_time, streams)
        if budget is not None and self.reasoning.enabled:  # thinking fitted to the first-answer target
            own = params.reasoning_budget
            params.reasoning_budget = budget if own is None else min(own, budget)

    def add_embedding(
        self, prompt_ids: list[int], pooling: str, normalize: bool, on_done: Done, job_id: str | None = None
    ) -> str:
        """Queue an embedding of a prompt: its final hidden states pooled (the mean over its tokens, or
        the last token's), L2-normalized if asked. Computed a chunk per step (engine/embeddings.py);
        `on_done(vector, None)` or `on_done(None, error)` is called on the thread that steps."""
        self.check_request(prompt_ids, SamplingParams(max_tokens=1))
        job_id = job_id or f"embed-{next(self._ids)}"
        self.embeddings.add(EmbeddingJob(job_id, list(prompt_ids), pooling, normalize, on_done))
        return job_id

    def abort_embedding(self, job_id: str) -> None:
        self.embeddings.abort(job_id)

    def embed(self, prompt_ids: list[int], pooling: str = "mean", normalize: bool = True) -> list[float]:
        """One embedding, now: steps the engine (requests in flight go on) until it is done."""
        result: list[tuple[list[float] | None, BaseException | None]] = []
        self.add_embedding(prompt_ids, pooling, normalize, lambda vector, error: result.append((vector, error)))
        while not result:
            self.step()
        vector, error = result[0]
        if error is not None:
            raise error
        assert vector is not None
        return vector

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.finish_request(request_id, FinishReason.ABORT)
        if request is None:
            return None
        self._forget(request_id)
        return self.outputs.output(request, [])

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or len(self.embeddings) > 0

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one forward over the scheduled batch; outputs for requests that got a token or failed.
        Then one chunk of a queued embedding, if any, sized to keep the streams' inter-token target.

        schedule -> execute -> update, then (with speculation) drafts for the next step are proposed
        for every decoding request at once."""
        outputs = self._generate()
        if self.embeddings:
            job = self.embeddings.jobs[0]
            limit = self.admission.chunk_limit(Streams.of(self.scheduler.running), job.num_computed)
            self.embeddings.step(min(limit, self.scheduler.max_num_batched_tokens))
        if self.check_invariants:
            check_invariants(self)
        return outputs

    def _generate(self) -> list[RequestOutput]:
        started = time.perf_counter()
        scheduled = self.scheduler.schedule(self.admission.step_limit(self.scheduler.running, self.scheduler.waiting))
        if scheduled.is_empty:
            return []
        now = time.monotonic()
        for s in scheduled.scheduled:
            s.request.first_scheduled_time = s.request.first_scheduled_time or now
            if self.governor is not None and s.request.draft_token_ids:  # (a no-op for a grammar's drafts)
                self.governor.verified(s.request.request_id, len(s.draft_token_ids))
        batch = self.scheduler.batch(scheduled)
        masks = {}
        if self.outputs.steering:
            for seq in batch.seqs:
                if seq.samples:
                    entry = self.outputs.mask(self.scheduler.requests[seq.request_id], seq.draft_token_ids)
                    if entry is not None:
                        masks[seq.request_id] = entry
        if masks:  # their masks fill on a worker thread while the forward runs
            batch.token_masks = TokenMasks(masks, self.model_config.vocab_size)
        result, failed = self.runner.execute_isolated(batch)
        if batch.token_masks is not None:
            batch.token_masks.wait()
            self.mask_seconds += batch.token_masks.seconds
        failed_requests = [(self.scheduler.requests[request_id], error) for request_id, error in failed]
        outputs = [self._fail(request, error) for request, error in failed_requests]
        updated: list[tuple[Request, list[int]]] = []
        for scheduled_request in scheduled.scheduled:
            request = scheduled_request.request
            if request.is_finished:  # (failed above)
                continue
            try:  # everything after the forward is per request: a failure here ends this request alone
                tokens = self.scheduler.advance(scheduled_request, result)
                keep, reason = self.outputs.accept(request, tokens) if tokens else (0, None)
                self.scheduler.settle(request, len(tokens) - keep, reason)
                if tokens:
                    updated.append((request, tokens[:keep]))
            except Exception as error:
                outputs.append(self._fail(request, error))
        if not failed:  # the proposer's time is the governor's to count, apart
            self.cost.observe(StepShape.of(batch), time.perf_counter() - started)
        self.admission.progress(self.scheduler.requests)
        if self.governor is not None:
            for request, tokens in updated:
                self.governor.observe(request.request_id, tokens)
        for request, tokens in updated:
            if request.finish_reason is FinishReason.ERROR:
                continue  # (its output is out already)
            try:
                if request.is_finished:
                    self._forget(request.request_id)
                elif self.governor is not None or self.outputs.steering:
                    self._propose_drafts(request)
                outputs.append(self.outputs.output(request, tokens))
            except Exception as error:
                outputs.append(self._fail(request, error))
        return outputs

    def _propose_drafts(self, request: Request) -> None:
        """Drafts for a running request whose next step samples, for the scheduler to verify. For a
        constrained request the tokens its grammar forces next first (the rest of a key, a closing
        quote...): accepted whenever the sampled token agrees, so a run of forced tokens costs one
        step instead of one each. Otherwise the speculative proposer's drafts (n-gram: JSON that
        copies the prompt), cut at the first token the grammar would refuse."""
        request.draft_token_ids = []
        room = draft_room(request)
        if room <= 0 or request.num_computed_tokens != request.num_tokens - 1:
            return  # still prefilling (or recomputing after a preemption)
        torch_seeded = request.sampling_params.seed is not None and self.runner.sampler.kernel is None
        closing = self.outputs.closing(request)
        if closing:  # its thinking budget is spent: the end tag, forced (its mask allows nothing else)
            if not torch_seeded:  # (else one forced token a step, by the mask alone)
                request.draft_token_ids = closing[:room]
            return
        request_id, constrained = request.request_id, self.outputs.is_constrained(request.request_id)
        if constrained:
            if torch_seeded:
                return  # PyTorch's per-request generators would advance differently: the seed's text would change
            if self.config.grammar_fast_forward and (forced := self.outputs.forced(request_id, room)):
                request.draft_token_ids = forced
                return
        if self.governor is None:
            return
        proposal = self.governor.drafts(request, room, len(self.scheduler.running))
        valid = self.outputs.valid_drafts(request_id, proposal) if constrained else len(proposal)
        if valid < len(proposal):
            self.governor.verified(request_id, valid)
        request.draft_token_ids = proposal[:valid]

    def _fail(self, request: Request, error: BaseException) -> RequestOutput:
        """End one request with FinishReason.ERROR; the engine and every other request go on."""
        logger.error("request %s failed and was ended; the others go on", request.request_id, exc_info=error)
        if not request.is_finished:
            self.scheduler.finish_request(request.request_id, FinishReason.ERROR)
        request.finish_reason = FinishReason.ERROR
        request.error = f"{type(error).__name__}: {error}"
        self._forget(request.request_id)
        return self.outputs.failed(request)

    def _forget(self, request_id: str) -> None:
        """Drop a finished request's per-request state (generator, admission, draft state)."""
        self.runner.release(request_id)
        self.admission.forget(request_id)
        if self.governor is not None:
            self.governor.release(request_id)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the matrices one decode step reads (the embedding table only as a tied lm_head)."""
        total = 0
        for module in self.runner.model.modules():  # a tied lm_head holds the table's storage
            if isinstance(module, Linear) and not isinstance(module, Embedding):
                total += module.quant.nbytes if module.quant is not None else module.weight.nbytes
        return total

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.source.name,
            "architecture": self.model_config.architecture,
            "device": str(self.runner.device),
            "max_model_len": self.max_model_len,
            "kv_cache_blocks": self.kv_cache.pool.num_blocks,
            "kernels": kernels.describe(),
            "prefetch": self.prefetch,
            "executors": [e.name for e in self.runner.executors],
            "speculative": self.config.speculative,
        }
