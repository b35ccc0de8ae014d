"""Check the docs site that tools/build_docs.py built (settings.ini's `doc_path`); exit 1 with a list of problems.

    python tools/check_docs.py            # checks of the built html, and the browser checks when Chromium is there
                                          # (as root, it is installed from Debian's packages when missing)
    python tools/check_docs.py --browser  # the browser checks are required (the default when $CI is set)

Static checks: a page per notebook (and `nbs/sidebar.yml` lists each one); every public symbol in the library's
`_modidx.py` has its nbdev anchor on its page and its name in the search index; no Quarto/nbdev syntax left in the
text (`#|`, `show_doc(`, `:::`, `{.callout`); no `$...$` left outside math; the code of hidden cells absent;
every image present; every link within the site resolves; no script or stylesheet loaded from the internet;
every pandas table styled as the theme's tables (class `docutils`, no `border`); every source link into the repository
names a line (not `#LNone`) that starts a definition.
Browser checks, in a 1280-pixel-wide window: MathJax typeset every formula without error; every visible code block
(`pre`) fits its box, no sideways scrolling (scrollWidth <= clientWidth); a screenshot of each page in
`<doc_path>/_screenshots/`.
"""
import argparse, ast, html, json, os, re, shutil, subprocess, sys, tempfile, threading
from configparser import ConfigParser
from functools import partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_docs import ROOT, html_name, split_options  # the same page names and `#|` parsing as the build

VOID_TAGS = {'area', 'base', 'br', 'col', 'embed', 'hr', 'img', 'input', 'link', 'meta', 'source', 'track', 'wbr'}
RAW_SYNTAX = ['#|', 'show_doc(', ':::', '{.callout']
_re_dollar_math = re.compile(r'\$(?=[^\s$])[^$\n]*?[^\s$\\]\$(?!\d)|\$\$[^$]+\$\$')  # as Pandoc reads `$...$`
WINDOW = (1280, 2000)  # the browser checks' window, in CSS pixels
# Injected into each page the check's server sends: after load, the visible `pre`s wider than their box, as JSON
PRE_CHECK = """<script>window.addEventListener('load', () => setTimeout(() => {
  const longest = t => t.split('\\n').reduce((a, b) => b.length > a.length ? b : a, '').trim().slice(0, 70);
  const wide = [...document.querySelectorAll('pre')].filter(p => p.offsetParent && p.scrollWidth > p.clientWidth)
    .map(p => `${p.scrollWidth} > ${p.clientWidth} px: ${longest(p.textContent)}`);
  const out = document.createElement('script');
  out.type = 'application/json'; out.id = 'check-docs-wide-pre';
  out.textContent = JSON.stringify(wide).replace(/</g, '\\\\u003c');
  document.body.appendChild(out);
}, 500));</script>"""
_re_wide_pre = re.compile(r'<script type="application/json" id="check-docs-wide-pre">(.*?)</script>', re.DOTALL)
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--no-first-run']


class Page(HTMLParser):
    "What the checks need from one html page: ids, links, scripts, images, math elements and visible text."
    def __init__(self, path):
        super().__init__(convert_charrefs=True)
        self.ids, self.hrefs, self.assets, self.imgs, self.n_math = set(), [], [], [], 0  # assets: scripts, <link>s
        self.tables = []  # (classes, border attribute) of each <table>
        self.text, self.prose, self._open = [], [], []  # visible text; the part outside code and math; open tags
        self.feed(path.read_text(encoding='utf-8'))
        self.text, self.prose = ''.join(self.text), ''.join(self.prose)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get('class') or '').split()
        if a.get('id'): self.ids.add(a['id'])
        if tag == 'a' and a.get('href'): self.hrefs.append(a['href'])
        if tag == 'script' and a.get('src'): self.assets.append(a['src'])
        if tag == 'link' and a.get('href'): self.assets.append(a['href'])
        if tag == 'img': self.imgs.append(a.get('src') or '')
        if tag == 'table': self.tables.append((classes, a.get('border')))
        if 'math' in classes: self.n_math += 1
        if tag in VOID_TAGS: return
        kind = ('hidden' if tag in ('script', 'style', 'template') else
                'code' if tag in ('pre', 'code') or 'math' in classes else None)
        self._open.append((tag, kind))

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                return

    def handle_data(self, data):
        kinds = {k for _, k in self._open}
        if 'hidden' in kinds: return
        self.text.append(data)
        if 'code' not in kinds: self.prose.append(data)


def settings():
    "settings.ini's [DEFAULT] section."
    cfg = ConfigParser(delimiters=['='])
    cfg.read(ROOT/'settings.ini', encoding='utf-8')
    return cfg['DEFAULT']


def notebooks(nbs):
    "Notebooks that get a page: as nbdev's `nbglob`, names and folders starting with `_` or `.` are skipped."
    return sorted(p for p in nbs.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(nbs).parts))


def snippet(text, i, width=60):
    "The text around position `i`, on one line."
    return ' '.join(text[max(0, i - width // 2): i + width // 2].split())


def check_pages(nbs, site, pages):
    "A page per notebook, and the sidebar lists every notebook."
    problems = []
    for nb in notebooks(nbs):
        page = html_name(nb.relative_to(nbs))
        if page not in pages: problems.append(f'{nb.relative_to(ROOT)}: no page {page} in the site')
    sidebar = nbs/'sidebar.yml'
    if sidebar.exists():
        listed = sidebar.read_text()
        for nb in notebooks(nbs):
            if nb.relative_to(nbs).as_posix() not in listed:
                problems.append(f'{sidebar.relative_to(ROOT)}: does not list {nb.relative_to(nbs).as_posix()}')
    return problems


def module_all(path):
    "The names in a module's `__all__` (read from its source, without importing it)."
    for node in ast.parse(path.read_text(encoding='utf-8')).body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == '__all__' for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def check_symbols(lib, site, pages):
    """Each public symbol of `_modidx.py` has its anchor on its page and its name in the search index.
    Top-level names (those in `__all__`) and patched methods strictly; a class's methods may use the class's anchor."""
    modidx = lib/'_modidx.py'
    if not modidx.exists(): return [f'{modidx.relative_to(ROOT)}: missing (run nbdev_export)']
    src = modidx.read_text(encoding='utf-8')
    syms = ast.literal_eval(src[src.index('d = ') + 4:])['syms']
    index = json.loads(re.search(r'Search\.setIndex\((.*)\)', (site/'searchindex.js').read_text(), re.DOTALL).group(1))
    titles, problems = set(index.get('alltitles', {})), []
    for mod, entries in syms.items():
        public = module_all(ROOT/next(iter(entries.values()))[1]) if entries else set()
        for full, (url, _) in entries.items():
            name = full[len(mod) + 1:]
            parts = name.split('.')
            if any(p.startswith('_') and not (p.startswith('__') and p.endswith('__')) for p in parts): continue
            if len(parts) == 1 and name not in public: continue
            page, _, anchor = url.partition('#')
            if page not in pages:
                problems.append(f'{full}: its page {page} is not in the site')
                continue
            lenient = len(parts) > 1 and parts[0] in public  # a method of one of this library's classes
            ok_ids = {anchor, anchor.split('.')[0]} if lenient else {anchor}
            ok_titles = {name, parts[0]} if lenient else {name}
            if not ok_ids & pages[page].ids: problems.append(f'{full}: no anchor #{anchor} in {page}')
            if not ok_titles & titles: problems.append(f'{full}: {name} is not in the search index')
    return problems


def check_text(page, p):
    "No Quarto/nbdev syntax in the visible text, and no `$...$` math left unrendered outside math elements."
    problems = [f'{page}: raw {s!r} in the text: "{snippet(p.text, p.text.index(s))}"' for s in RAW_SYNTAX if s in p.text]
    for m in _re_dollar_math.finditer(p.prose):
        problems.append(f'{page}: unrendered math {m.group(0)!r}: "{snippet(p.prose, m.start())}"')
    return problems


def check_source_links(page, p, cfg):
    """Each `show_doc` source link into the repository (`git_url`, `branch`) names a line of an existing file (not
    `#LNone`), and that line starts a definition (`def`, `class`)."""
    prefix = f"{cfg['git_url'].rstrip('/')}/blob/{cfg['branch']}/"
    problems = []
    for href in p.hrefs:
        if not href.startswith(prefix): continue
        path, _, frag = href[len(prefix):].partition('#')
        m = re.fullmatch(r'L(\d+)', frag)
        if not m:
            problems.append(f'{page}: source link without a line number: {href}')
            continue
        lines = (ROOT/path).read_text(encoding='utf-8').splitlines() if (ROOT/path).is_file() else []
        n = int(m.group(1))
        if not 0 < n <= len(lines) or not lines[n - 1].lstrip().startswith(('def ', 'class ', 'async def ')):
            problems.append(f'{page}: source link to a line that starts no definition: {href}')
    return problems


def check_tables(page, p):
    "pandas' tables carry the theme's table class (`docutils`) and no `border` attribute."
    bad = [c for c, border in p.tables if 'dataframe' in c and ('docutils' not in c or border is not None)]
    return [f'{page}: {len(bad)} pandas table(s) without the theme\'s table style'] if bad else []


def hidden_lines(nb_path):
    "A distinctive line of each hidden cell's code (`#| hide` or `include: false`) of a source notebook."
    cells = json.loads(nb_path.read_text(encoding='utf-8'))['cells']
    def src(c): return ''.join(c.get('source', ''))
    def is_hidden(c):
        opts, _ = split_options(src(c))
        return c['cell_type'] == 'code' and ('hide' in opts or opts.get('include') == 'false')
    shown = '\n'.join(src(c) + json.dumps(c.get('outputs', [])) for c in cells if not is_hidden(c))
    res = []
    for c in filter(is_hidden, cells):
        lines = [l.strip() for l in split_options(src(c))[1].splitlines()]
        lines = [l for l in lines if len(l) >= 10 and not l.startswith(('#', 'import ', 'from ')) and l not in shown]
        if lines: res.append(max(lines, key=len))
    return res


def check_hidden(nbs, pages):
    "The code of hidden cells does not appear on the page."
    problems = []
    for nb in notebooks(nbs):
        page = html_name(nb.relative_to(nbs))
        for line in hidden_lines(nb) if page in pages else []:
            if line in pages[page].text: problems.append(f'{page}: shows code of a hidden cell of {nb.name}: {line!r}')
    return problems


def check_files(site, page, p, parsed):
    "Images present, links within the site resolve, and no script or stylesheet comes from the internet."
    problems, base = [], (site/page).parent
    for src in p.assets:
        if re.match(r'^(https?:)?//', src): problems.append(f'{page}: loads a script or stylesheet from the internet: {src}')
    for src in p.imgs:
        if src.startswith(('data:', 'http:', 'https:')): continue
        if not (base/unquote(urlsplit(src).path)).is_file(): problems.append(f'{page}: image {src} is missing')
    for href in p.hrefs:
        url = urlsplit(href)
        if url.scheme or url.netloc or not (url.path.endswith('.html') or (not url.path and url.fragment)): continue
        target = (base/unquote(url.path)).resolve() if url.path else (site/page).resolve()
        if not target.is_file():
            problems.append(f'{page}: link to a missing page: {href}')
            continue
        rel = target.relative_to(site.resolve()).as_posix()
        if rel not in parsed: parsed[rel] = Page(target)  # e.g. genindex.html
        if url.fragment and unquote(url.fragment) not in parsed[rel].ids:
            problems.append(f'{page}: link to a missing anchor: {href}')
    return problems


def chromium(install):
    "The Chromium binary; if missing and `install`, installed from Debian's packages first."
    names = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')  # GitHub's runners: Chrome
    found = next(filter(None, map(shutil.which, names)), None)
    if found or not install or not shutil.which('apt-get'): return found
    print('check_docs: installing chromium (apt-get) for the browser checks', flush=True)
    subprocess.run('apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null',
                   shell=True)
    return shutil.which('chromium')


class CheckHandler(SimpleHTTPRequestHandler):
    "Serves the site quietly, with `PRE_CHECK` injected into each html page."
    def log_message(self, *args): pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if path.suffix != '.html' or not path.is_file(): return super().do_GET()
        body = path.read_bytes().replace(b'</body>', PRE_CHECK.encode() + b'</body>', 1)
        self.send_response(200)
        self.send_header('Content-Type', 'text/html; charset=utf-8')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def check_browser(site, pages, exe):
    """Open each page in headless Chromium `exe` over a localhost server: math typeset without errors, code blocks
    that fit their box; save screenshots."""
    shots = site/'_screenshots'
    shots.mkdir(exist_ok=True)
    server = ThreadingHTTPServer(('127.0.0.1', 0), partial(CheckHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    problems = []
    try:
        for page, p in sorted(pages.items()):
            with tempfile.TemporaryDirectory() as profile:
                cmd = [exe, *CHROMIUM_FLAGS, f'--user-data-dir={profile}', '--virtual-time-budget=10000',
                       f'--window-size={WINDOW[0]},{WINDOW[1]}', f'--screenshot={shots/page.replace("/", "_")[:-5]}.png', '--dump-dom',
                       f'http://127.0.0.1:{server.server_port}/{page}']
                try: r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
                except subprocess.TimeoutExpired:
                    problems.append(f'{page}: chromium timed out')
                    continue
            dom = r.stdout
            if r.returncode or '</html>' not in dom:
                problems.append(f'{page}: chromium failed (exit {r.returncode}): {r.stderr.strip()[-300:]}')
                continue
            typeset = dom.count('<mjx-container')
            if typeset < p.n_math: problems.append(f'{page}: MathJax typeset {typeset} of {p.n_math} formulas')
            for err in sorted(set(re.findall(r'data-mjx-error="([^"]*)"', dom))):
                problems.append(f'{page}: MathJax error: {html.unescape(err)}')
            for macro in sorted(set(re.findall(r'<mtext mathcolor="red">(\\[^<]*)</mtext>', dom))):
                problems.append(f'{page}: MathJax: undefined macro {html.unescape(macro)}')
            wide = _re_wide_pre.search(dom)
            if not wide: problems.append(f'{page}: the code-block width check did not run')
            for w in json.loads(wide.group(1)) if wide else []:
                problems.append(f'{page}: code block scrolls sideways at {WINDOW[0]} px ({w})')
    finally: server.shutdown()
    print(f'check_docs: screenshots in {shots.relative_to(ROOT)}/')
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--browser', action='store_true', help='require the headless-Chromium checks (as on CI); otherwise they run when Chromium is available')
    args = ap.parse_args()
    cfg = settings()
    site, nbs, lib = ROOT/cfg['doc_path'], ROOT/cfg['nbs_path'], ROOT/cfg['lib_path']
    if not (site/'index.html').exists(): sys.exit(f'check_docs: no site in {site}; run tools/build_docs.py first')
    pages = {p.relative_to(site).as_posix(): Page(p) for p in sorted(site.rglob('*.html'))
             if not p.relative_to(site).parts[0].startswith('_') and p.name not in ('genindex.html', 'search.html')}
    problems = check_pages(nbs, site, pages) + check_symbols(lib, site, pages) + check_hidden(nbs, pages)
    parsed = dict(pages)  # every page parsed so far, for the links' anchors
    for page, p in pages.items():
        problems += (check_text(page, p) + check_files(site, page, p, parsed) + check_tables(page, p)
                     + check_source_links(page, p, cfg))
    required = args.browser or bool(os.environ.get('CI'))  # elsewhere they run when Chromium is there or root can install it
    exe = chromium(install=required or os.geteuid() == 0)
    if exe: problems += check_browser(site, pages, exe)
    elif required: problems.append('browser checks: no chromium (apt-get install chromium)')
    else: print('check_docs: no chromium: browser checks skipped (apt-get install chromium; CI=1 makes them required)')
    problems = list(dict.fromkeys(problems))  # a broken sidebar link shows on every page: report it once a page
    if problems:
        print(f'check_docs: {len(problems)} problem(s) in {site.relative_to(ROOT)}/:', *problems, sep='\n  ')
        sys.exit(1)
    print(f'check_docs: {len(pages)} pages OK')


if __name__ == '__main__': main()
