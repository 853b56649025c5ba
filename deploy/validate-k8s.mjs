// Offline checks of rendered deployment files, used by deploy/validate.sh.
//
//   node deploy/validate-k8s.mjs validate FILE...
//       Validates every object of the multi-document YAML FILEs against the
//       Kubernetes schemas of the `kubernetes-models` package (types, enums,
//       required fields; misspelled keys are not caught). An object whose
//       apiVersion/kind the package does not know is an error.
//   node deploy/validate-k8s.mjs topology FILE JOBFILE
//       Checks that the rendered StatefulSet tessera-server has
//       job.num_shards replicas and the Job tessera-worker has job.num_workers
//       completions and parallelism.
//   node deploy/validate-k8s.mjs commands FILE...
//   node deploy/validate-k8s.mjs compose-commands FILE
//       Prints what every container runs, one line per flag or subcommand:
//         flag<TAB>BINARY<TAB>NAME<TAB>WHERE
//         subcommand<TAB>BINARY<TAB>NAME<TAB>WHERE
//         error<TAB>-<TAB>MESSAGE<TAB>WHERE
//       `commands` reads Kubernetes manifests (containers, init containers,
//       exec probes); `compose-commands` reads `docker-compose config` output
//       (command, healthcheck test).
//
// Exit status: 0 when every check passed, 1 otherwise, 2 on bad usage.

import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const BINARIES = new Set(["tessera-server", "tessera-worker", "tessera"]);

function loadDocuments(file) {
  const docs = [];
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length > 0) {
      throw new Error(`${file}: ${doc.errors.map((e) => e.message).join("; ")}`);
    }
    const value = doc.toJS();
    if (value !== null && value !== undefined) docs.push(value);
  }
  return docs;
}

function describe(obj) {
  const ns = obj?.metadata?.namespace ? `${obj.metadata.namespace}/` : "";
  return `${obj?.kind ?? "?"} ${ns}${obj?.metadata?.name ?? "?"}`;
}

// "v1" -> kubernetes-models/v1/Kind; "apps/v1" -> kubernetes-models/apps/v1/Kind
async function modelClass(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string" ||
      !/^([a-z0-9.-]+\/)?v[0-9a-z]+$/.test(apiVersion) || !/^[A-Z][A-Za-z0-9]*$/.test(kind)) {
    return null;
  }
  try {
    const module = await import(`kubernetes-models/${apiVersion}/${kind}`);
    const cls = module[kind];
    return cls && cls.apiVersion === apiVersion && cls.kind === kind ? cls : null;
  } catch {
    return null;
  }
}

async function validate(files) {
  let failed = 0;
  let count = 0;
  for (const file of files) {
    for (const obj of loadDocuments(file)) {
      count++;
      const cls = await modelClass(obj?.apiVersion, obj?.kind);
      if (cls === null) {
        console.log(`FAIL ${describe(obj)}: unknown apiVersion/kind ${obj?.apiVersion}/${obj?.kind}`);
        failed++;
        continue;
      }
      try {
        new cls(obj).validate();
        console.log(`ok   ${obj.apiVersion} ${describe(obj)}`);
      } catch (err) {
        const details = Array.isArray(err?.errors)
          ? err.errors.map((e) => `${e.instancePath || "/"} ${e.message}`).join("; ")
          : String(err?.message ?? err);
        console.log(`FAIL ${obj.apiVersion} ${describe(obj)}: ${details}`);
        failed++;
      }
    }
  }
  if (count === 0) {
    console.log("FAIL no objects found");
    failed++;
  }
  return failed === 0;
}

function jobField(jobText, field) {
  const m = jobText.match(new RegExp(`^\\s*${field}\\s*:\\s*(\\d+)\\s*(#.*)?$`, "m"));
  return m ? Number(m[1]) : null;
}

function topology(file, jobFile) {
  const objs = loadDocuments(file);
  const jobText = readFileSync(jobFile, "utf8");
  const shards = jobField(jobText, "num_shards");
  const workers = jobField(jobText, "num_workers");
  const find = (kind, name) => objs.find((o) => o.kind === kind && o.metadata?.name === name);
  const sts = find("StatefulSet", "tessera-server");
  const job = find("Job", "tessera-worker");
  const checks = [
    ["job.num_shards set", shards !== null, `${jobFile} has no num_shards`],
    ["job.num_workers set", workers !== null, `${jobFile} has no num_workers`],
    ["StatefulSet tessera-server present", sts !== undefined, "not rendered"],
    ["Job tessera-worker present", job !== undefined, "not rendered"],
  ];
  if (sts && shards !== null) {
    checks.push(["StatefulSet replicas = job.num_shards", sts.spec?.replicas === shards,
                 `replicas ${sts.spec?.replicas}, num_shards ${shards}`]);
  }
  if (job && workers !== null) {
    checks.push(["Job completions = job.num_workers", job.spec?.completions === workers,
                 `completions ${job.spec?.completions}, num_workers ${workers}`]);
    checks.push(["Job parallelism = job.num_workers", job.spec?.parallelism === workers,
                 `parallelism ${job.spec?.parallelism}, num_workers ${workers}`]);
  }
  let ok = true;
  for (const [what, pass, why] of checks) {
    console.log(pass ? `ok   ${what}` : `FAIL ${what}: ${why}`);
    ok &&= pass;
  }
  return ok;
}

// Prints the flags and subcommand of one command line (an argv array).
function emitArgv(argv, where) {
  if (!Array.isArray(argv) || argv.length === 0 || argv.some((a) => typeof a !== "string")) {
    console.log(`error\t-\tcommand is not a list of strings\t${where}`);
    return;
  }
  const binary = argv[0].split("/").pop();
  if (!BINARIES.has(binary)) {
    console.log(`error\t-\tunexpected program '${argv[0]}'\t${where}`);
    return;
  }
  let sawSubcommand = false;
  for (const arg of argv.slice(1)) {
    if (arg.startsWith("--")) {
      const name = arg.slice(2).split("=")[0];
      if (name === "") {
        console.log(`error\t-\tbare '--' is not expected\t${where}`);
        continue;
      }
      console.log(`flag\t${binary}\t${name}\t${where}`);
    } else if (arg.startsWith("-") && arg.length > 1) {
      console.log(`error\t-\tsingle-dash option '${arg}'\t${where}`);
    } else if (binary === "tessera" && !sawSubcommand) {
      console.log(`subcommand\t${binary}\t${arg}\t${where}`);
      sawSubcommand = true;
    }
    // Anything else is a positional argument (e.g. tessera health ADDR).
  }
}

// Walks a Kubernetes object and reports every container's command line.
function emitContainers(node, where) {
  if (Array.isArray(node)) {
    node.forEach((item) => emitContainers(item, where));
    return;
  }
  if (node === null || typeof node !== "object") return;
  for (const key of ["containers", "initContainers"]) {
    if (!Array.isArray(node[key])) continue;
    for (const c of node[key]) {
      const at = `${where} ${key === "containers" ? "container" : "initContainer"} ${c?.name}`;
      if (!Array.isArray(c?.command)) {
        console.log(`error\t-\tno command (the image's CMD would get the args)\t${at}`);
      } else {
        emitArgv([...c.command, ...(c.args ?? [])], at);
      }
      for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
        if (c?.[probe]?.exec) emitArgv(c[probe].exec.command, `${at} ${probe}`);
      }
    }
  }
  for (const [key, value] of Object.entries(node)) {
    if (key !== "containers" && key !== "initContainers") emitContainers(value, where);
  }
}

function commands(files) {
  for (const file of files) {
    for (const obj of loadDocuments(file)) emitContainers(obj, describe(obj));
  }
  return true;
}

function composeCommands(file) {
  const [config] = loadDocuments(file);
  for (const [name, service] of Object.entries(config?.services ?? {})) {
    const where = `compose service ${name}`;
    if (!Array.isArray(service.command)) {
      console.log(`error\t-\tcommand must be a list\t${where}`);
    } else {
      emitArgv(service.command, where);
    }
    const test = service.healthcheck?.test;
    if (test !== undefined) {
      if (Array.isArray(test) && test[0] === "CMD") {
        emitArgv(test.slice(1), `${where} healthcheck`);
      } else {
        console.log(`error\t-\thealthcheck.test must be ["CMD", ...]\t${where}`);
      }
    }
  }
  return true;
}

const [mode, ...args] = process.argv.slice(2);
let ok;
try {
  if (mode === "validate" && args.length > 0) ok = await validate(args);
  else if (mode === "topology" && args.length === 2) ok = topology(args[0], args[1]);
  else if (mode === "commands" && args.length > 0) ok = commands(args);
  else if (mode === "compose-commands" && args.length === 1) ok = composeCommands(args[0]);
  else {
    console.error("usage: validate-k8s.mjs validate|commands FILE... | topology FILE JOBFILE | compose-commands FILE");
    process.exit(2);
  }
} catch (err) {
  console.log(`FAIL ${err?.message ?? err}`);
  ok = false;
}
process.exit(ok ? 0 : 1);
