"""`rulework.testing`: the scripted executor and in-memory store used by users' tests."""

from __future__ import annotations

import pytest

from rulework import ExecutorError, Process
from rulework.engine.process import ProcessRunner
from rulework.engine.store import Store
from rulework.testing import MemoryCache, ScriptedExecutor, ScriptedResult, memory_store


async def test_scripted_executor_answers_and_records_processes() -> None:
    assert await memory_store().store_bytes(b"x")  # an in-memory store works on its own

    def script(process: Process) -> ScriptedResult:
        if process.argv[0] == "compile":
            return ScriptedResult(stdout=b"ok\n", outputs={"out/a.o": b"\x7fELF"})
        raise LookupError("unexpected command")

    executor = ScriptedExecutor(script, name="local")
    cache = MemoryCache()
    from rulework.engine.cache import open_cache_layer

    async with open_cache_layer(cache, None) as layer:
        store = Store(layer.local_blobs)  # the store must write where the cache reads
        async with ProcessRunner({"local": executor}, "local", store, layer) as runner:
            result = await runner.run(Process(["compile", "a.c"], output_files=["out/a.o"]))
            assert result.exit_code == 0 and result.stdout == b"ok\n"
            files = await store.contents(result.output_digest)
            assert [(f.path, f.content) for f in files] == [("out/a.o", b"\x7fELF")]
            again = await runner.run(Process(["compile", "a.c"], output_files=["out/a.o"]))
            assert again.metadata.source == "local_cache"
            with pytest.raises(ExecutorError, match="unexpected command"):
                await runner.run(Process(["link"]))
    assert [p.argv[0] for p in executor.calls] == ["compile", "link"]
