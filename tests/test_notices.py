"""What a run prints that is not kclip's: expected third-party notices are dropped where they are expected, and
importing bitsandbytes never reaches for the network (it would fetch a Hub kernel on CPUs with AVX512-BF16)."""
import logging
import os
import subprocess
import sys
import textwrap

from kclip.notices import drop_notice


def test_drop_notice_drops_only_its_text_and_only_inside_the_block():
    logger = logging.getLogger("kclip.test.notices")
    before = list(logger.filters)
    record = lambda msg: logging.LogRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None)  # noqa: E731
    with drop_notice(logger.name, "expected"):
        assert not logger.filter(record("an expected notice")) and logger.filter(record("something else"))
    assert logger.filters == before and logger.filter(record("an expected notice"))


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # as a user without the switch
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_bitsandbytes_import_is_silent_and_offline():
    out = _fresh_python("""
        import logging, socket
        logging.basicConfig(level=logging.WARNING)
        tried = []
        def no_network(*args, **kwargs):
            tried.append(args[:1])
            raise OSError("no network in this test")
        socket.create_connection = no_network
        socket.socket.connect = lambda self, *a: no_network(*a)
        from huggingface_hub import constants
        was = constants.HF_HUB_OFFLINE
        from kclip.quantize import import_bitsandbytes
        import_bitsandbytes()
        assert constants.HF_HUB_OFFLINE == was, "the offline switch must be restored"
        assert not tried, tried
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    for notice in ("Failed to load CPU gemm_4bit_forward", "Skipping publisher trust check"):
        assert notice not in out.stderr, out.stderr[-2000:]


def test_random_init_is_not_announced():
    out = _fresh_python("""
        import logging
        logging.basicConfig(level=logging.WARNING)
        from kclip.model import build_clip
        build_clip("kclip-tiny", pretrained="", seed=0)
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    assert "No pretrained weights loaded" not in out.stderr, out.stderr[-2000:]
