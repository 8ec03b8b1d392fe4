// Scores a cache-tests (http-tests/cache-tests, cache-tests.fyi) results JSON the way
// cache-tests.fyi does, for benches/cache_tests.sh.
//
//   node benches/cache_tests_report.mjs SUITE_DIR RESULTS_JSON [MIN_REQUIRED]
//
// SUITE_DIR is the suite's root (the one holding tests/index.mjs). A test is "required" when its
// `kind` is "required" or absent (test-engine/lib/results.mjs); `optimal` and `check` tests are
// not conformance requirements. A required test passes only when its result is `true` and every
// test in its `depends_on` passed (pass, or "yes" for a check); a failed dependency makes it a
// dependency failure (cache-tests.fyi's grey circle), a PUT/setup problem a setup failure.
// browser_only tests are never run by the command-line client and are not counted.
// Prints the score, then the failing required tests grouped by test file, with the failure
// message. Exits 3 when MIN_REQUIRED is given and fewer required tests passed.

import fs from 'fs'
import path from 'path'
import { pathToFileURL } from 'url'

const [suiteDir, resultsFile, minArg] = process.argv.slice(2)
if (!suiteDir || !resultsFile) {
  console.error('usage: cache_tests_report.mjs SUITE_DIR RESULTS_JSON [MIN_REQUIRED]')
  process.exit(2)
}
const testsDir = path.join(suiteDir, 'tests')
const results = JSON.parse(fs.readFileSync(resultsFile, 'utf8'))

// The suites the CLI runs: tests/index.mjs, plus any other tests/*.mjs suite the CLI adds on its
// own (npm 0.4.5's cli.mjs pushes surrogate-control.mjs) — recognised by its ids in the results.
const suites = [...(await import(pathToFileURL(path.join(testsDir, 'index.mjs')).href)).default]
const fileOf = new Map() // suite id -> file name
for (const f of fs.readdirSync(testsDir).filter(f => f.endsWith('.mjs') && f !== 'index.mjs').sort()) {
  let mod
  try { mod = (await import(pathToFileURL(path.join(testsDir, f)).href)).default } catch { continue }
  if (!mod || !Array.isArray(mod.tests) || !mod.id) continue
  fileOf.set(mod.id, f.replace(/\.mjs$/, ''))
  if (!suites.some(s => s.id === mod.id) && mod.tests.some(t => t.id in results)) suites.push(mod)
}

const tests = new Map() // id -> {test, suite}
for (const suite of suites) for (const test of suite.tests) tests.set(test.id, { test, suite })

// determineTestResult of test-engine/lib/results.mjs, returning [type, detail].
const memo = new Map()
function outcome (id) {
  if (memo.has(id)) return memo.get(id)
  const { test } = tests.get(id) || {}
  const result = results[id]
  let out
  if (!test) out = ['untested', `unknown test ${id}`]
  else if (result === undefined) out = ['untested', 'not run']
  else {
    const failedDep = (test.depends_on || []).find(d => !['pass', 'yes'].includes(outcome(d)[0]))
    if (failedDep !== undefined) {
      const [t, msg] = outcome(failedDep)
      out = ['dependency_fail', `depends on ${failedDep} (${t}: ${msg})`]
    } else if (result[0] === 'Setup') {
      out = result[1] === 'retry' ? ['retry', 'the cache retried a request'] : ['setup_fail', result[1]]
    } else if (result[0] === 'AbortError') {
      out = ['harness_fail', `${result[0]}: ${result[1]}`]
    } else {
      const kind = test.kind || 'required'
      const ok = result === true
      const detail = ok ? '' : (Array.isArray(result) ? (result[0] === 'Assertion' ? result[1] : `${result[0]}: ${result[1]}`) : String(result))
      if (kind === 'required') out = [ok ? 'pass' : 'fail', detail]
      else if (kind === 'optimal') out = [ok ? 'pass' : 'optional_fail', detail]
      else if (kind === 'check') out = [ok ? 'yes' : 'no', detail]
      else out = ['harness_fail', `unknown kind ${kind}`]
    }
  }
  memo.set(id, out)
  return out
}

const counted = [...tests.values()].filter(({ test }) => test.browser_only !== true)
const byKind = { required: [], optimal: [], check: [] }
for (const e of counted) (byKind[e.test.kind || 'required'] ||= []).push(e)

const required = byKind.required
const passed = required.filter(({ test }) => outcome(test.id)[0] === 'pass')
const optimalPassed = byKind.optimal.filter(({ test }) => outcome(test.id)[0] === 'pass')
const checkYes = byKind.check.filter(({ test }) => outcome(test.id)[0] === 'yes')

console.log(`REQUIRED: ${passed.length}/${required.length} passed`)
console.log(`optimal: ${optimalPassed.length}/${byKind.optimal.length} passed; check: ${checkYes.length}/${byKind.check.length} "yes"`)

console.log(`passing required: ${passed.map(({ test }) => test.id).join(' ') || 'none'}`)

const failing = required.filter(({ test }) => outcome(test.id)[0] !== 'pass')
const types = {}
for (const { test } of failing) { const t = outcome(test.id)[0]; types[t] = (types[t] || 0) + 1 }
console.log(`failing required: ${failing.length} (${Object.entries(types).map(([t, n]) => `${t} ${n}`).join(', ') || 'none'})`)

// The failed tests at the bottom of a dependency chain: what must be fixed to unblock a test.
function rootOf (id) {
  const roots = new Set()
  for (const d of tests.get(id).test.depends_on || []) {
    const t = outcome(d)[0]
    if (t === 'dependency_fail') rootOf(d).forEach(r => roots.add(r))
    else if (!['pass', 'yes'].includes(t)) roots.add(d)
  }
  return [...roots]
}
// What the test itself reported, dependencies aside (as `--id` shows it).
function ownResult (id) {
  const r = results[id]
  if (r === true) return 'pass'
  if (r === undefined) return 'not run'
  return Array.isArray(r) ? `${r[0] === 'Assertion' ? '' : r[0] + ': '}${r[1]}`.replace(/\s+/g, ' ').trim() : String(r)
}

const blocked = {}
for (const { test } of failing) {
  if (outcome(test.id)[0] !== 'dependency_fail') continue
  for (const r of rootOf(test.id)) blocked[r] = (blocked[r] || 0) + 1
}
if (Object.keys(blocked).length) {
  console.log('\nrequired tests blocked by a failed dependency, by the failing test at the root of the chain:')
  for (const [r, n] of Object.entries(blocked).sort((a, b) => b[1] - a[1])) {
    const [t, msg] = outcome(r)
    console.log(`  ${String(n).padStart(3)}  ${r} (${tests.get(r).test.kind || 'required'}; ${t}: ${msg.replace(/\s+/g, ' ').trim()})`)
  }
}

let lastSuite
for (const { test, suite } of failing) {
  if (suite !== lastSuite) {
    const n = required.filter(e => e.suite === suite).length
    const nf = failing.filter(e => e.suite === suite).length
    console.log(`\n## ${fileOf.get(suite.id) || suite.id}.mjs — ${suite.name} (${nf} of ${n} required failing)`)
    lastSuite = suite
  }
  const [t, msg] = outcome(test.id)
  const name = (test.name || '').replace(/\s+/g, ' ')
  console.log(`- ${test.id} [${t}] ${name}`)
  if (t === 'dependency_fail') {
    console.log(`    -> blocked by ${rootOf(test.id).join(', ')}; own result: ${ownResult(test.id)}`)
  } else {
    console.log(`    -> ${msg.replace(/\s+/g, ' ').trim()}`)
  }
}

if (minArg !== undefined && minArg !== '') {
  const min = parseInt(minArg, 10)
  if (passed.length < min) {
    console.log(`\nFAIL: ${passed.length} required tests passed, fewer than --min ${min}`)
    process.exit(3)
  }
}
