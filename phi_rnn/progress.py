"""What training prints per iteration: on a terminal a tqdm progress bar (iterations/s, ETA,
epoch and loss); elsewhere (a batch job's output file, a pipe) char-rnn's line
`i/N (epoch e), train_loss = ..., grad/param norm = ..., time/batch = ...s`."""
import sys


class Progress:
    def __init__(self, start, last, iterations, print_every, log=print, terminal=None):
        """Iterations start+1 .. last of the `iterations` that max_epochs makes; log prints
        the lines. terminal None: whether stdout is one."""
        self.iterations, self.print_every, self._log = iterations, print_every, log
        if terminal is None:
            terminal = sys.stdout.isatty()
        self.bar = None
        if terminal:
            from tqdm import tqdm
            try:
                self.bar = tqdm(total=last, initial=start, unit="it", dynamic_ncols=True, file=sys.stdout,
                                smoothing=0.05)
            except OSError:
                pass  # a terminal already gone: the lines, through log

    def _on_bar(self, draw):
        """draw() on the bar; a terminal that went away (EIO, EPIPE) must not stop training,
        so from then on everything goes through log, which copes with it."""
        try:
            draw()
            return True
        except OSError:
            self.bar.disable = True  # nothing more from tqdm, not even when it is collected
            self.bar = None
            return False

    def log(self, message, **_):
        """A message line; above the bar when there is one."""
        if self.bar is None or not self._on_bar(lambda: self.bar.write(message, file=sys.stdout)):
            self._log(message, flush=True)

    def iteration(self, i, epoch, loss, norm_ratio, seconds):
        if self.bar is not None:
            self.bar.set_postfix_str(f"epoch {epoch:.2f}, train_loss {loss:.4f}, {seconds * 1e3:.1f} ms/it",
                                     refresh=False)
            if self._on_bar(lambda: self.bar.update(1)):
                return
        if i % self.print_every == 0:
            self._log(f"{i}/{self.iterations} (epoch {epoch:.3f}), train_loss = {loss:6.8f}, "
                      f"grad/param norm = {norm_ratio:6.4e}, time/batch = {seconds:.4f}s", flush=True)

    def close(self):
        if self.bar is not None:
            self._on_bar(self.bar.close)
