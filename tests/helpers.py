"""Small helpers shared by the test modules."""
import subprocess
import sys
import textwrap


def lock_holder(folder, command="train", seconds=60):
    """A live process that holds ``folder``'s lock (``omh-ref <command>``) until it is killed or
    ``seconds`` pass; returned once it holds it. The caller kills and waits for it."""
    code = textwrap.dedent(f"""
        import sys, time
        from omh_ref.core.lock import FolderLock
        with FolderLock({str(folder)!r}, {command!r}, say=lambda m: print(m, file=sys.stderr)):
            print("held", flush=True)
            time.sleep({seconds})
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p
