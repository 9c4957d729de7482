// A small terminal emulator (VT100/xterm subset: cursor motion, erase, insert/delete,
// scroll regions, SGR colours, the alternate screen) rendered as text into a focusable
// element. Keys become bytes for `onData`; `fit()` sizes it to its element and calls
// `onResize(cols, rows)`.

const enc = new TextEncoder();
const SCROLLBACK = 1000;

function blank(n) {
  const row = [];
  for (let i = 0; i < n; i++) row.push([' ', 0]);
  return row;
}

// Attributes packed in one number: fg (5 bits, 0 = default, 1..16 = colour+1), bg (same,
// shifted 5), bold (bit 10), reverse (bit 11).
const FG = 0x1f, BG = 0x1f << 5, BOLD = 1 << 10, REV = 1 << 11;

export class Terminal {
  constructor(el) {
    this.el = el;
    this.cols = 80;
    this.rows = 24;
    this.onData = () => {};
    this.onResize = () => {};
    this.decoder = new TextDecoder('utf-8');
    this.reset();
    el.classList.add('term');
    el.tabIndex = 0;
    el.setAttribute('role', 'application');
    el.setAttribute('aria-label', 'Terminal');
    this.screenEl = document.createElement('div');
    el.appendChild(this.screenEl);
    el.addEventListener('keydown', (e) => this.key(e));
    el.addEventListener('paste', (e) => {
      e.preventDefault();
      this.onData(enc.encode(e.clipboardData.getData('text')));
    });
    this.pending = false;
  }

  reset() {
    this.screen = [];
    for (let i = 0; i < this.rows; i++) this.screen.push(blank(this.cols));
    this.scrollback = [];
    this.alt = null;
    this.x = 0; this.y = 0; this.attr = 0; this.wrapNext = false;
    this.top = 0; this.bottom = this.rows - 1;
    this.saved = { x: 0, y: 0, attr: 0 };
    this.state = 'text'; this.params = ''; this.osc = '';
    this.cursorVisible = true; this.appCursor = false;
  }

  // Size to the element; tells `onResize` when it changed.
  fit() {
    const m = document.createElement('span');
    m.className = 'measure';
    m.textContent = 'MMMMMMMMMM';
    this.el.appendChild(m);
    const cw = m.getBoundingClientRect().width / 10;
    const ch = m.getBoundingClientRect().height;
    m.remove();
    const style = getComputedStyle(this.el);
    const w = this.el.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight) - 16;
    const h = this.el.clientHeight - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom);
    const cols = Math.max(20, Math.min(1000, Math.floor(w / (cw || 8))));
    const rows = Math.max(5, Math.min(1000, Math.floor(h / (ch || 16))));
    if (cols !== this.cols || rows !== this.rows) {
      this.resize(cols, rows);
      this.onResize(cols, rows);
    }
  }

  resize(cols, rows) {
    const fix = (row) => {
      while (row.length < cols) row.push([' ', 0]);
      row.length = cols;
      return row;
    };
    this.screen = this.screen.map(fix);
    while (this.screen.length > rows) {
      this.scrollback.push(this.screen.shift());
      this.y = Math.max(0, this.y - 1);
    }
    while (this.screen.length < rows) this.screen.push(blank(cols));
    this.cols = cols; this.rows = rows;
    this.top = 0; this.bottom = rows - 1;
    this.x = Math.min(this.x, cols - 1); this.y = Math.min(this.y, rows - 1);
    this.render();
  }

  write(bytes) {
    const text = typeof bytes === 'string' ? bytes : this.decoder.decode(bytes, { stream: true });
    for (const c of text) this.char(c);
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.render(); });
    }
  }

  char(c) {
    const code = c.codePointAt(0);
    switch (this.state) {
      case 'esc': return this.escape(c);
      case 'csi':
        if (code >= 0x40 && code <= 0x7e) { this.state = 'text'; return this.csi(c, this.params); }
        this.params += c;
        return;
      case 'osc':
        if (code === 7) { this.state = 'text'; return; }
        if (code === 0x1b) { this.state = 'oscEsc'; return; }
        return;
      case 'oscEsc': this.state = 'text'; return;
      case 'charset': this.state = 'text'; return;
    }
    if (code === 0x1b) { this.state = 'esc'; return; }
    if (code < 0x20 || code === 0x7f) return this.control(code);
    this.print(c);
  }

  control(code) {
    switch (code) {
      case 8: if (this.x > 0) this.x--; this.wrapNext = false; break;
      case 9: this.x = Math.min(this.cols - 1, (Math.floor(this.x / 8) + 1) * 8); break;
      case 10: case 11: case 12: this.lineFeed(); break;
      case 13: this.x = 0; this.wrapNext = false; break;
    }
  }

  print(c) {
    if (this.wrapNext) { this.x = 0; this.lineFeed(); this.wrapNext = false; }
    this.screen[this.y][this.x] = [c, this.attr];
    if (this.x === this.cols - 1) this.wrapNext = true; else this.x++;
  }

  lineFeed() {
    if (this.y === this.bottom) this.scrollUp(1);
    else if (this.y < this.rows - 1) this.y++;
  }

  scrollUp(n) {
    for (let i = 0; i < n; i++) {
      const gone = this.screen.splice(this.top, 1)[0];
      if (this.top === 0 && !this.alt) {
        this.scrollback.push(gone);
        if (this.scrollback.length > SCROLLBACK) this.scrollback.shift();
      }
      this.screen.splice(this.bottom, 0, blank(this.cols));
    }
  }

  scrollDown(n) {
    for (let i = 0; i < n; i++) {
      this.screen.splice(this.bottom, 1);
      this.screen.splice(this.top, 0, blank(this.cols));
    }
  }

  escape(c) {
    this.state = 'text';
    switch (c) {
      case '[': this.state = 'csi'; this.params = ''; break;
      case ']': this.state = 'osc'; break;
      case '(': case ')': this.state = 'charset'; break;
      case '7': this.saved = { x: this.x, y: this.y, attr: this.attr }; break;
      case '8': Object.assign(this, this.saved); break;
      case 'M': if (this.y === this.top) this.scrollDown(1); else if (this.y > 0) this.y--; break;
      case 'D': this.lineFeed(); break;
      case 'E': this.x = 0; this.lineFeed(); break;
      case 'c': this.reset(); break;
    }
  }

  csi(final, raw) {
    const priv = raw.startsWith('?');
    const ps = (priv ? raw.slice(1) : raw).split(';').map((p) => parseInt(p, 10));
    // Counts and positions past the screen mean the screen's edge: a box printing
    // `ESC[2000000000S` must not make the viewer's tab loop two billion times.
    const most = Math.max(this.rows, this.cols);
    const p = (i, d) => (Number.isNaN(ps[i]) || ps[i] === undefined || ps[i] === 0 ? d : Math.min(ps[i], most));
    const clampY = (y) => Math.max(0, Math.min(this.rows - 1, y));
    const clampX = (x) => Math.max(0, Math.min(this.cols - 1, x));
    this.wrapNext = false;
    switch (final) {
      case 'A': this.y = Math.max(this.top, this.y - p(0, 1)); break;
      case 'B': this.y = Math.min(this.bottom, this.y + p(0, 1)); break;
      case 'C': this.x = clampX(this.x + p(0, 1)); break;
      case 'D': this.x = clampX(this.x - p(0, 1)); break;
      case 'E': this.x = 0; this.y = clampY(this.y + p(0, 1)); break;
      case 'F': this.x = 0; this.y = clampY(this.y - p(0, 1)); break;
      case 'G': case '`': this.x = clampX(p(0, 1) - 1); break;
      case 'd': this.y = clampY(p(0, 1) - 1); break;
      case 'H': case 'f': this.y = clampY(p(0, 1) - 1); this.x = clampX(p(1, 1) - 1); break;
      case 'J': this.eraseDisplay(ps[0] || 0); break;
      case 'K': this.eraseLine(ps[0] || 0); break;
      case 'L': if (this.y >= this.top && this.y <= this.bottom) { const t = this.top; this.top = this.y; this.scrollDown(p(0, 1)); this.top = t; } break;
      case 'M': if (this.y >= this.top && this.y <= this.bottom) { const t = this.top; this.top = this.y; this.scrollUp(p(0, 1)); this.top = t; } break;
      case 'P': { const row = this.screen[this.y]; row.splice(this.x, p(0, 1)); while (row.length < this.cols) row.push([' ', this.attr]); break; }
      case '@': { const row = this.screen[this.y]; for (let i = 0; i < p(0, 1); i++) row.splice(this.x, 0, [' ', this.attr]); row.length = this.cols; break; }
      case 'X': for (let i = 0; i < p(0, 1) && this.x + i < this.cols; i++) this.screen[this.y][this.x + i] = [' ', this.attr]; break;
      case 'S': this.scrollUp(p(0, 1)); break;
      case 'T': this.scrollDown(p(0, 1)); break;
      case 'r': this.top = clampY(p(0, 1) - 1); this.bottom = clampY(p(1, this.rows) - 1); this.x = 0; this.y = this.top; break;
      case 's': this.saved = { x: this.x, y: this.y, attr: this.attr }; break;
      case 'u': Object.assign(this, this.saved); break;
      case 'm': this.sgr(ps); break;
      case 'n': if (ps[0] === 6) this.onData(enc.encode(`\x1b[${this.y + 1};${this.x + 1}R`)); break;
      case 'h': case 'l': if (priv) this.mode(ps, final === 'h'); break;
    }
  }

  mode(ps, on) {
    for (const m of ps) {
      if (m === 25) this.cursorVisible = on;
      if (m === 1) this.appCursor = on;
      if (m === 1049 || m === 47 || m === 1047) {
        if (on && !this.alt) {
          this.alt = { screen: this.screen, x: this.x, y: this.y };
          this.screen = [];
          for (let i = 0; i < this.rows; i++) this.screen.push(blank(this.cols));
        } else if (!on && this.alt) {
          this.screen = this.alt.screen; this.x = this.alt.x; this.y = this.alt.y;
          this.alt = null;
        }
      }
    }
  }

  sgr(ps) {
    if (ps.length === 0 || Number.isNaN(ps[0])) ps = [0];
    for (let i = 0; i < ps.length; i++) {
      const n = Number.isNaN(ps[i]) ? 0 : ps[i];
      if (n === 0) this.attr = 0;
      else if (n === 1) this.attr |= BOLD;
      else if (n === 22) this.attr &= ~BOLD;
      else if (n === 7) this.attr |= REV;
      else if (n === 27) this.attr &= ~REV;
      else if (n >= 30 && n <= 37) this.attr = (this.attr & ~FG) | (n - 30 + 1);
      else if (n >= 90 && n <= 97) this.attr = (this.attr & ~FG) | (n - 90 + 9);
      else if (n === 39) this.attr &= ~FG;
      else if (n >= 40 && n <= 47) this.attr = (this.attr & ~BG) | ((n - 40 + 1) << 5);
      else if (n >= 100 && n <= 107) this.attr = (this.attr & ~BG) | ((n - 100 + 1) << 5);
      else if (n === 49) this.attr &= ~BG;
      else if (n === 38 || n === 48) {
        // 256-colour or true colour: the first 16 of the palette are kept, the rest skipped.
        if (ps[i + 1] === 5) {
          const c = ps[i + 2];
          if (c < 16) this.attr = n === 38 ? (this.attr & ~FG) | (c + 1) : (this.attr & ~BG) | ((c % 8 + 1) << 5);
          i += 2;
        } else if (ps[i + 1] === 2) i += 4;
      }
    }
  }

  eraseDisplay(m) {
    if (m === 0) { this.eraseLine(0); for (let y = this.y + 1; y < this.rows; y++) this.screen[y] = blank(this.cols); }
    else if (m === 1) { this.eraseLine(1); for (let y = 0; y < this.y; y++) this.screen[y] = blank(this.cols); }
    else { for (let y = 0; y < this.rows; y++) this.screen[y] = blank(this.cols); if (m === 3) this.scrollback = []; }
  }

  eraseLine(m) {
    const row = this.screen[this.y];
    const [a, b] = m === 0 ? [this.x, this.cols] : m === 1 ? [0, this.x + 1] : [0, this.cols];
    for (let x = a; x < b; x++) row[x] = [' ', this.attr];
  }

  key(e) {
    let s = null;
    const cur = (c) => (this.appCursor ? '\x1bO' : '\x1b[') + c;
    switch (e.key) {
      case 'Enter': s = '\r'; break;
      case 'Backspace': s = '\x7f'; break;
      case 'Tab': s = '\t'; break;
      case 'Escape': s = '\x1b'; break;
      case 'ArrowUp': s = cur('A'); break;
      case 'ArrowDown': s = cur('B'); break;
      case 'ArrowRight': s = cur('C'); break;
      case 'ArrowLeft': s = cur('D'); break;
      case 'Home': s = '\x1b[H'; break;
      case 'End': s = '\x1b[F'; break;
      case 'Delete': s = '\x1b[3~'; break;
      case 'Insert': s = '\x1b[2~'; break;
      case 'PageUp': s = '\x1b[5~'; break;
      case 'PageDown': s = '\x1b[6~'; break;
      default:
        if (e.key.length === 1 && e.ctrlKey && !e.altKey && !e.metaKey) {
          const c = e.key.toUpperCase().charCodeAt(0);
          if (c >= 0x40 && c <= 0x5f) s = String.fromCharCode(c & 0x1f);
          else if (e.key === ' ') s = '\x00';
        } else if (e.key.length === 1 && !e.metaKey) {
          s = (e.altKey ? '\x1b' : '') + e.key;
        }
    }
    // Shift+Tab leaves the terminal for the page's next control (keyboard users).
    if (e.key === 'Tab' && e.shiftKey) return;
    if (s === null) return;
    e.preventDefault();
    this.onData(enc.encode(s));
  }

  // Text of the screen (and scrollback), for tests and copy.
  text() {
    return this.scrollback.concat(this.screen).map((r) => r.map((c) => c[0]).join('').trimEnd()).join('\n');
  }

  render() {
    const frag = document.createDocumentFragment();
    const focused = document.activeElement === this.el;
    const rows = this.scrollback.concat(this.screen);
    const curRow = this.scrollback.length + this.y;
    rows.forEach((row, ri) => {
      const line = document.createElement('div');
      line.className = 'line';
      let span = null, spanAttr = -1, cursorHere = -1;
      if (ri === curRow && this.cursorVisible && focused) cursorHere = this.x;
      row.forEach(([ch, attr], ci) => {
        const a = ci === cursorHere ? -2 : attr;
        if (a !== spanAttr) {
          span = document.createElement('span');
          if (a === -2) span.className = 'cur';
          else {
            const cls = [];
            let fg = attr & FG, bg = (attr & BG) >> 5;
            if (attr & REV) { const t = fg; fg = bg || 8; bg = t || 8; }
            if (fg) cls.push('f' + (fg - 1));
            if (bg) cls.push('g' + ((bg - 1) % 8));
            if (attr & BOLD) cls.push('b');
            span.className = cls.join(' ');
          }
          spanAttr = a;
          line.appendChild(span);
        }
        span.textContent += ch;
      });
      frag.appendChild(line);
    });
    this.screenEl.replaceChildren(frag);
    this.el.scrollTop = this.el.scrollHeight;
  }
}
