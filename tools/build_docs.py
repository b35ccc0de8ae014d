"""Build the docs site: nbdev's own notebook processing, a small Quarto-to-MyST translation, then Sphinx + MyST-NB.

Run from anywhere inside the repo:

    python tools/build_docs.py                # the site, into settings.ini's `doc_path` (docs/), and README.md
    python tools/build_docs.py --readme-only  # only README.md, from the index notebook

Steps of a full build:
1. nbdev: `refresh_quarto_yml`, `_modidx.py`, `nbs/sidebar.yml` and `proc_nbs` (notebooks processed into `_proc/`).
2. Each processed notebook is translated from Quarto's dialect to MyST-NB's (front matter, `#|` options,
   `show_doc` output, callouts, links) into the Sphinx source folder `_proc/_sphinx/`, named as Quarto would
   name its page (`nbs/00_losses.ipynb` -> `losses.html`).
3. Sphinx (furo theme, saved outputs, warnings are errors) builds the site, with MathJax from the npm
   registry (cached in `.cache/`) so that no page loads anything from the internet.
"""
import argparse, os, posixpath, re, shutil, subprocess, sys, tarfile, textwrap, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATHJAX_VERSION = '3.2.2'
CALLOUTS = {'note': 'note', 'tip': 'tip', 'warning': 'warning', 'important': 'important', 'caution': 'caution'}
SPHINX_SRC = '_sphinx'  # inside nbdev's `_proc/`

# Quarto-only syntax
_re_option = re.compile(r'^\s*#\|\s*([\w-]+)\s*(?::\s*(.*?))?\s*$')
_re_div_open = re.compile(r'^(:{3,})\s*\{(.*)\}\s*$')
_re_div_close = re.compile(r'^(:{3,})\s*$')
_re_fence = re.compile(r'^\s*(`{3,}|~{3,})')
_re_callout = re.compile(r'\.callout-(\w+)')
_re_title_attr = re.compile(r'title\s*=\s*"([^"]*)"')
_re_md_heading = re.compile(r'^(#{1,6})\s+(.+?)\s*$', re.MULTILINE)
_re_source_link = re.compile(r'^\[source\]\((\S+?)\)(\{[^}]*\})?\s*$', re.MULTILINE)
_re_md_link = re.compile(r'(?<!!)\[([^\]\n]*)\]\(([^)\s]+)\)')
_re_ipynb_url = re.compile(r'^([^:#?]+)\.ipynb(#.*)?$')
_re_html_url = re.compile(r'^[^:#?/][^:#?]*\.html(#.*)?$')
_re_dunder = re.compile(r'(?<![\w\\])__[A-Za-z]\w*?__(?!\w)')
_re_protected = re.compile(r'(`+)[\s\S]*?\1|\$\$[\s\S]*?\$\$|\$[^$\n]*\$|\]\([^)]*\)|<[^>\n]*>')  # code, math, URLs, html


def setup_env():
    "Work from the repo root, with the repo's own package importable and the env vars the Makefile sets."
    os.chdir(ROOT)
    os.environ.setdefault('IPYTHONDIR', str(ROOT/'.cache'/'ipython'))
    os.environ.setdefault('MPLBACKEND', 'Agg')
    Path(os.environ['IPYTHONDIR']).mkdir(parents=True, exist_ok=True)
    os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))
    if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))


def html_name(nb_path):
    "The page nbdev/Quarto make from a notebook path, e.g. `00_losses.ipynb` -> `losses.html` (posix string)."
    from nbdev.doclinks import _nbpath2html
    return _nbpath2html(Path(nb_path)).as_posix()


# ---------------------------------------------------------------- 1. nbdev's processing

def fix_source_lines():
    """`show_doc`'s source link of a symbol imported from the library ends in `#LNone` in nbdev 2.4 (its line table
    is keyed by the name inside the module, `EntropyLogger.plot`, but asked for the full name,
    `label_smoothing_fa.callbacks.EntropyLogger.plot`: AnswerDotAI/nbdev#1418): look up the name inside the module too.
    Symbols defined in the notebook itself (`__main__`) are found either way; check_docs.py checks every link's line."""
    import nbdev.doclinks
    lineno = nbdev.doclinks._lineno
    if getattr(lineno, 'looks_inside_module', False): return
    def _lineno(sym, fname):
        line = lineno(sym, fname)
        mod = fname[:-3].replace('/', '.') if fname and fname.endswith('.py') else None
        if line is None and mod and sym.startswith(mod + '.'): line = lineno(sym[len(mod) + 1:], fname)
        return line
    _lineno.looks_inside_module = True
    nbdev.doclinks._lineno = _lineno


def nbdev_process(cfg):
    "Run nbdev's own docs preparation (as `nbdev_proc_nbs` does, minus installing Quarto); return `_proc/`."
    import nbdev.doclinks
    fix_source_lines()  # before the workers start: they inherit it
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import proc_nbs
    refresh_quarto_yml()
    nbdev.doclinks._build_modidx()
    nbdev_sidebar.__wrapped__(path=cfg.nbs_path)
    return proc_nbs(cfg.nbs_path, n_workers=min(os.cpu_count() or 1, 4), force=True)


def nbdev_process_one(cfg, rel):
    "Process the single notebook `nbs/rel` into `_proc/rel` (in this process); return the processed path."
    from nbdev.processors import FilterDefaults
    import nbdev.serve_drv
    fix_source_lines()
    src, dst = cfg.nbs_path/rel, cfg.config_path/'_proc'/rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbdev.serve_drv.main((src, dst, FilterDefaults))
    return dst


# ---------------------------------------------------------------- 2. Quarto -> MyST translation

def split_options(source):
    "Split a code cell's source into its `#|` options (a dict) and the code without `#|` lines."
    opts, code = {}, []
    for line in source.splitlines():
        m = _re_option.match(line)
        if m: opts[m.group(1)] = (m.group(2) or '').strip('\'"').lower()
        else: code.append(line)
    return opts, '\n'.join(code).strip('\n')


def escape_md(s):
    "Escape characters Markdown would read as emphasis (e.g. the underscores in `__call__`)."
    return re.sub(r'([_*])', r'\\\1', s)


def escape_dunders(md):
    "Escape dunder names (`__call__`) in prose, so they show as written, not as bold; code, math and URLs untouched."
    def esc(text): return _re_dunder.sub(lambda m: escape_md(m.group(0)), text)
    out, pos = [], 0
    for m in _re_protected.finditer(md):
        out += [esc(md[pos:m.start()]), m.group(0)]
        pos = m.end()
    return ''.join(out) + esc(md[pos:])


def translate_link(url, page, doc_url, readme):
    "Where a link should point: own-site and notebook links become relative `.html` links (absolute in README)."
    if doc_url and url.startswith(doc_url + '/'): target = url[len(doc_url) + 1:]
    elif (m := _re_ipynb_url.match(url)):
        nb = posixpath.normpath(posixpath.join(posixpath.dirname(page), m.group(1) + '.ipynb'))
        target = html_name(nb) + (m.group(2) or '')
    elif readme and _re_html_url.match(url): target = posixpath.normpath(posixpath.join(posixpath.dirname(page), url))
    else: return url
    if readme: return f'{doc_url}/{target}'
    path, _, frag = target.partition('#')
    rel = posixpath.relpath(path or 'index.html', posixpath.dirname(page) or '.')
    return rel + (f'#{frag}' if frag else '')


def _private_anchor(url):
    "A link nbdev made to a private symbol (`#_name`): such symbols have no section, so no anchor to point at"
    frag = url.partition('#')[2]
    return frag.startswith('_') and not frag.startswith('__')


def translate_links(md, page, doc_url, readme):
    "Apply `translate_link` to every Markdown link (not images) in `md`; links to private symbols become their text."
    def link(m):
        if _private_anchor(m.group(2)): return m.group(1)
        return f'[{m.group(1)}]({translate_link(m.group(2), page, doc_url, readme)})'
    return _re_md_link.sub(link, md)


def callout_opening(div, readme):
    "The first line(s) of a callout: a MyST admonition, or a GitHub alert in README."
    kind, title, colons = div['kind'], div['title'], div['colons']
    if readme: return f'> [!{kind.upper()}]' + (f'\n> **{title}**\n>' if title else '')
    if title: return f'{colons}{{admonition}} {title}\n:class: {kind}'
    return f'{colons}{{{kind}}}'


def translate_divs(md, readme):
    """Quarto's fenced divs: callouts become MyST admonitions (GitHub alerts in README), other divs are unwrapped.
    A callout's title is its `title="..."` attribute, or else a heading on its first line, as in Quarto."""
    out, stack, fence = [], [], None
    for line in md.splitlines():
        if fence:
            if line.strip().startswith(fence): fence = None
        elif (m := _re_fence.match(line)): fence = m.group(1)
        elif (m := _re_div_open.match(line)):
            callout, title = _re_callout.search(m.group(2)), _re_title_attr.search(m.group(2))
            div = dict(colons=m.group(1), kind=callout and CALLOUTS.get(callout.group(1), 'note'),
                       title=title and title.group(1), at=len(out), empty=True)
            stack.append(div)
            if div['kind']: out.append(callout_opening(div, readme))
            continue
        elif _re_div_close.match(line) and stack:
            div = stack.pop()
            if div['kind'] and not readme: out.append(div['colons'])
            continue
        callout = next((d for d in reversed(stack) if d['kind']), None)
        if callout:
            heading = _re_md_heading.match(line)
            if callout['empty'] and heading and not callout['title']:
                callout['title'] = heading.group(2)
                out[callout['at']] = callout_opening(callout, readme)
                continue
            if line.strip(): callout['empty'] = False
            if readme: line = ('> ' + line).rstrip()
        out.append(line)
    return '\n'.join(out)


def translate_markdown(md, page, doc_url, readme):
    "Translate a markdown cell's Quarto-only syntax."
    return translate_links(escape_dunders(translate_divs(md, readme)), page, doc_url, readme)


def show_doc_markdown(md, readme, seen):
    """`show_doc`'s markdown as a plain section: heading (underscores escaped), source link, signature, docs.
    The section carries nbdev's anchor (the name lowercased); returns None for a name already shown on the page."""
    from docutils.nodes import make_id
    m = _re_md_heading.search(md)
    if not m: return md
    level, name = m.groups()
    name = name.replace('\\', '')  # as nbdev's anchors: the plain name, lowercased
    anchor = name.lower()
    if name in seen: return None  # by name: `ECE` (a class) and `ece` (a function) are both shown
    seen.add(name)
    parts = []
    # Sphinx gives the section the id `make_id(name)`; where that differs from nbdev's anchor, add nbdev's.
    if not readme and make_id(anchor) != anchor: parts.append(f'<div id="{anchor}"></div>')
    if (src := _re_source_link.search(md[:m.start()])):  # before the heading, floated right beside it
        parts.append(f'[source]({src.group(1)})' + ('' if readme else '{.sourcelink}'))
    parts.append(f'{level} {escape_md(name)}')
    parts.append(escape_dunders(md[m.end():].strip()))
    return '\n\n'.join(p for p in parts if p)


def output_markdown(cell):
    "The markdown an `output: asis` cell prints or displays."
    res = []
    for o in cell.get('outputs', []):
        if o.get('output_type') == 'stream': res.append(''.join(o.get('text', '')))
        elif 'text/markdown' in o.get('data', {}): res.append(''.join(o['data']['text/markdown']))
    return '\n\n'.join(res)


def front_matter(source):
    "The YAML front matter dict of a raw cell (empty if it is not front matter)."
    import yaml
    m = re.match(r'^---\s*\n(.*?)\n---\s*$', source.strip(), re.DOTALL)
    try: return (yaml.safe_load(m.group(1)) or {}) if m else {}
    except yaml.YAMLError: return {}


def translate_nb(nb, page, doc_url, readme=False):
    "Translate a processed notebook (nbformat node) in place for MyST-NB, or for README.md if `readme`."
    import nbformat
    cells, seen, has_title = [], set(), False
    for cell in nb.cells:
        if cell.cell_type == 'raw' and (fm := front_matter(cell.source)):
            title = f"# {fm.get('title') or Path(page).stem}"
            desc = fm.get('description')
            cells.append(nbformat.v4.new_markdown_cell(title + (f"\n\n{'> ' if readme else ''}{desc}" if desc else '')))
            has_title = True
        elif cell.cell_type == 'markdown':
            cell.source = translate_markdown(cell.source, page, doc_url, readme)
            cells.append(cell)
        elif cell.cell_type == 'code':
            cells.extend(translate_code_cell(cell, page, doc_url, readme, seen))
        else: cells.append(cell)
    if not has_title: cells.insert(0, nbformat.v4.new_markdown_cell(f'# {Path(page).stem}'))
    nb.cells = cells
    nb.metadata.setdefault('language_info', {'name': 'python'})
    return nb


def translate_code_cell(cell, page, doc_url, readme, seen):
    "A code cell's replacement cells: `#|` options become MyST-NB tags, `output: asis` output becomes markdown."
    import nbformat
    opts, cell.source = split_options(cell.source)
    if opts.get('include') == 'false': return []
    tags = list(cell.metadata.get('tags', []))
    if opts.get('echo') == 'false': tags.append('remove-input')
    if opts.get('output') == 'false': tags.append('remove-output')
    if opts.get('code-fold') == 'true': tags.append('hide-input')
    if tags: cell.metadata['tags'] = tags
    for o in cell.get('outputs', []): theme_tables(o.get('data', {}))
    if opts.get('output') != 'asis': return [cell]
    md = output_markdown(cell)
    if cell.source.lstrip().startswith('show_doc('): md = show_doc_markdown(md, readme, seen)
    res = [] if opts.get('echo') == 'false' else [nbformat.v4.new_code_cell(cell.source)]
    if md: res.append(nbformat.v4.new_markdown_cell(translate_links(md, page, doc_url, readme)))
    return res


_re_df_table = re.compile(r'<table border="1" class="dataframe">')


def theme_tables(data):
    "pandas' HTML tables in an output's `data` (in place): the theme's `docutils` table class, no `border=1`."
    html = data.get('text/html')
    if html is None: return
    fix = lambda t: _re_df_table.sub('<table class="dataframe docutils">', t)
    data['text/html'] = [fix(t) for t in html] if isinstance(html, list) else fix(html)


def toctree(sidebar_yml):
    "MyST toctree directives (hidden; furo shows them as the sidebar) in `sidebar.yml` order."
    import yaml
    groups = [(None, [])]
    def walk(contents, caption):
        for o in contents:
            if isinstance(o, str):
                if o.endswith('.ipynb') and html_name(o) != 'index.html': groups[-1][1].append(html_name(o)[:-5])
            elif isinstance(o, dict):
                name = o.get('section', '')
                groups.append((f'{caption} / {name}' if caption else name, []))
                if o.get('href', '').endswith('.ipynb'): groups[-1][1].append(html_name(o['href'])[:-5])
                walk(o.get('contents', []), groups[-1][0])
    walk(yaml.safe_load(sidebar_yml.read_text())['website']['sidebar']['contents'], None)
    return '\n\n'.join('```{toctree}\n:hidden:\n' + (f':caption: {cap}\n' if cap else '') + '\n' + '\n'.join(docs) + '\n```'
                       for cap, docs in groups if docs)


def write_sources(cfg, proc, src):
    "Translate every processed notebook into the Sphinx source folder `src`, plus the files they use."
    import nbformat
    doc_url = doc_site_url(cfg)
    shutil.rmtree(src, ignore_errors=True)
    for f in sorted(proc.rglob('*')):
        rel = f.relative_to(proc)
        if not f.is_file() or rel.parts[0] in (SPHINX_SRC, '_build'): continue
        if f.suffix == '.ipynb':
            page = html_name(rel)
            nb = translate_nb(read_notebook(f), page, doc_url)
            if page == 'index.html': nb.cells.append(nbformat.v4.new_markdown_cell(toctree(cfg.nbs_path/'sidebar.yml')))
            dest = src/(page[:-5] + '.ipynb')
            dest.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, dest)
        elif f.suffix not in ('.yml', '.yaml', '.md', '.qmd', '.py') and rel.name != 'styles.css':
            (src/rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, src/rel)
    if not (src/'index.ipynb').exists():
        (src/'index.md').write_text(f'# {cfg.title}\n\n{cfg.description}\n\n{toctree(cfg.nbs_path/"sidebar.yml")}\n')


def read_notebook(path):
    "Read a notebook as an nbformat v4 node, without nbformat's warnings about missing cell ids."
    import nbformat
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        nb = nbformat.read(path, as_version=4)
        nbformat.validator.normalize(nb)
    return nb


def doc_site_url(cfg):
    "The published site's URL (`doc_host` + `doc_baseurl`), which nbdev's links point to."
    return (cfg.get('doc_host', '') + cfg.get('doc_baseurl', '')).rstrip('/')


# ---------------------------------------------------------------- README.md

def notebook_markdown(nb):
    "A translated notebook as Markdown, by nbconvert's MarkdownExporter (MyST-NB tags obeyed, images left out)."
    from nbconvert import MarkdownExporter
    from traitlets.config import Config
    for cell in nb.cells:  # README.md has no place for image files
        for o in cell.get('outputs', []):
            for mime in [m for m in o.get('data', {}) if m.startswith('image/')]: del o['data'][mime]
    c = Config()
    c.TagRemovePreprocessor.update(enabled=True, remove_cell_tags={'remove-cell'}, remove_input_tags={'remove-input'},
                                   remove_all_outputs_tags={'remove-output'})
    body, _ = MarkdownExporter(config=c).from_notebook_node(nb)
    return re.sub(r'\n{3,}', '\n\n', body).strip() + '\n'


def write_readme(cfg, proc_index):
    "Write README.md from the processed index notebook (deterministic: same notebooks, same bytes)."
    nb = translate_nb(read_notebook(proc_index), 'index.html', doc_site_url(cfg), readme=True)
    md = notebook_markdown(nb)  # links to the published site (`doc_host` + `doc_baseurl`), as nbdev's README has them
    (cfg.config_path/'README.md').write_text(md, encoding='utf-8')


# ---------------------------------------------------------------- 3. Sphinx

CONF_PY = '''\
# Generated by tools/build_docs.py; edit that script instead.
project = {title!r}
author = {author!r}
copyright = {copyright!r}
html_title = {title!r}
extensions = ["myst_nb", "sphinx.ext.githubpages"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "attrs_inline"]
myst_all_links_external = True  # build_docs.py rewrites notebook links to pages; check_docs.py checks them
suppress_warnings = ["myst.header"]  # show_doc headings are h3, often right under the h1 title
nb_execution_mode = "off"
nb_render_markdown_format = "myst"
nb_merge_streams = True
exclude_patterns = ["**.ipynb_checkpoints"]
html_theme = "furo"
html_static_path = ["_static", {mathjax_dir!r}]
html_css_files = ["nbdev.css"]
mathjax_path = "mathjax/tex-mml-chtml.js"
html_show_sourcelink = False
html_copy_source = False
'''

CSS = """\
p:has(> a.sourcelink:only-child) { float: right; margin: 1.6rem 0 0 1rem; font-size: smaller; }
/* Code lines are at most 100 characters: widen furo's 46em content so that they fit without sideways scrolling
   (at 1280 px furo hides the table of contents on the right, which leaves the room) */
@media (min-width: 63em) { .content { width: 58em; } }
/* The site title breaks between words only, never inside label_smoothing_fa */
.sidebar-brand-text { overflow-wrap: normal; word-break: keep-all; white-space: nowrap; font-size: 1.3rem; }
/* pandas DataFrames (rewritten to the theme's `docutils` tables by build_docs.py): wide ones scroll on their own */
div.cell_output table.dataframe { display: block; max-width: 100%; overflow-x: auto; margin: .5rem 0; }
div.cell_output table.dataframe td, div.cell_output table.dataframe th { padding: .1rem .5rem; text-align: right; }
"""


def fetch_mathjax(cache):
    "MathJax's es5 build, from the npm registry (cached): returns a folder holding `mathjax/tex-mml-chtml.js`."
    dest = cache/f'mathjax-{MATHJAX_VERSION}'
    if (dest/'mathjax'/'tex-mml-chtml.js').exists(): return dest
    tgz = cache/'npm'/f'mathjax-{MATHJAX_VERSION}.tgz'
    if not tgz.exists():
        if not shutil.which('npm'): sys.exit('build_docs: npm is needed (once) to fetch MathJax: apt-get install npm')
        tgz.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(['npm', 'pack', f'mathjax@{MATHJAX_VERSION}', '--pack-destination', str(tgz.parent)],
                           capture_output=True, text=True)
        if r.returncode: sys.exit(f'build_docs: npm pack mathjax@{MATHJAX_VERSION} failed:\n{r.stderr}')
    tmp = cache/f'mathjax-{MATHJAX_VERSION}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tgz) as tf:
        tf.extractall(tmp, members=[m for m in tf.getmembers() if m.name.startswith('package/es5/')], filter='data')
    (tmp/'package'/'es5').rename(tmp/'mathjax')
    shutil.rmtree(tmp/'package')
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def run_sphinx(cfg, src, out):
    "Write conf.py and run Sphinx (html, warnings are errors); exit non-zero if it fails."
    from sphinx.cmd.build import build_main
    mathjax = fetch_mathjax(cfg.config_path/'.cache')
    (src/'_static').mkdir(parents=True, exist_ok=True)
    (src/'_static'/'nbdev.css').write_text(CSS)
    (src/'conf.py').write_text(CONF_PY.format(title=cfg.title, author=cfg.author, copyright=cfg.copyright,
                                              mathjax_dir=str(mathjax)))
    build = src.parent/'_build'  # MyST-NB writes output images beside the html folder, so build here, then move
    shutil.rmtree(build, ignore_errors=True)
    rc = build_main(['-b', 'html', '-W', '--keep-going', '-q', '-d', str(build/'doctrees'), str(src), str(build/'html')])
    if rc: sys.exit(f'build_docs: Sphinx failed (exit {rc}); see the warnings above')
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(build/'html', out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--readme-only', action='store_true', help='only (re)write README.md from the index notebook')
    args = p.parse_args()
    setup_env()
    from nbdev.config import get_config
    cfg, t0 = get_config(), time.time()
    if args.readme_only:
        if not (cfg.nbs_path/cfg.readme_nb).exists(): return print(f'build_docs: no {cfg.readme_nb}; README.md left as is')
        write_readme(cfg, nbdev_process_one(cfg, cfg.readme_nb))
        return print(f'build_docs: wrote README.md in {time.time()-t0:.0f}s')
    proc = Path(nbdev_process(cfg))
    print(f'build_docs: nbdev processed the notebooks into {proc.name}/ ({time.time()-t0:.0f}s)')
    if (proc/cfg.readme_nb).exists(): write_readme(cfg, proc/cfg.readme_nb)
    write_sources(cfg, proc, proc/SPHINX_SRC)
    run_sphinx(cfg, proc/SPHINX_SRC, cfg.doc_path)
    print(f'build_docs: built {cfg.doc_path.relative_to(cfg.config_path)}/ in {time.time()-t0:.0f}s')


if __name__ == '__main__': main()  # the guard matters: nbdev's proc_nbs starts workers with `spawn`
