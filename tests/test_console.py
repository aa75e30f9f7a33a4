"""console.install(): the pack's log records in the terminal, prefixed once per line, above a running bar."""
import io
import logging

from tqdm import tqdm

from acestep_lora import console


def test_records_print_once_with_one_prefix_per_line_above_the_bar(capsys):
    root = io.StringIO()  # an application's own root handler (ComfyUI has one) must not print them again
    handler = logging.StreamHandler(root)
    logging.getLogger().addHandler(handler)
    try:
        console.install()
        console.install()  # idempotent: still one line per record
        import importlib.util
        spec = importlib.util.spec_from_file_location("pack_x_console", console.__file__)
        copy = importlib.util.module_from_spec(spec)  # the node pack's own import of this module
        spec.loader.exec_module(copy)
        copy.install()
        bar = tqdm(total=10, file=io.StringIO(), disable=False)  # a bar is running
        logging.getLogger("acestep_lora.train").info("done: 2 epochs\nPEFT adapter: /x")
        bar.close()
    finally:
        logging.getLogger().removeHandler(handler)
    out = capsys.readouterr().out
    assert out == "[ACE-Step LoRA] done: 2 epochs\n[ACE-Step LoRA] PEFT adapter: /x\n"
    assert root.getvalue() == ""


def test_count_bar_off_a_terminal_logs_a_line_per_step(capsys):
    console.install()
    bar = console.CountBar("prepare")
    bar.update(1, 2, "encoded a.wav")  # captured output is no terminal: no bar, a line
    bar.close()
    assert capsys.readouterr().out == "[ACE-Step LoRA] prepare 1/2: encoded a.wav\n"
