// Prints the SQL Prisma's schema engine (its WebAssembly build, no downloaded binaries) would run to
// create storage/schema.prisma on an empty PostgreSQL. Usage:
//   node ddl.mjs ../../storage/schema.prisma 'postgresql://postgres@localhost/postgres?host=/socket/dir'
// The engine wants a live connection only to learn the server's version; it changes nothing there.
import fs from 'node:fs';
import path from 'node:path';
import { PrismaPg } from '@prisma/adapter-pg';
import { bindMigrationAwareSqlAdapterFactory } from '@prisma/driver-adapter-utils';

const pkgDir = path.join(path.dirname(new URL(import.meta.url).pathname), 'node_modules/@prisma/schema-engine-wasm/');
const bindings = await import(pkgDir + 'schema_engine_bg.js');
const { instance } = await WebAssembly.instantiate(
  fs.readFileSync(pkgDir + 'schema_engine_bg.wasm'), { './schema_engine_bg.js': bindings });
bindings.__wbg_set_wasm(instance.exports);
instance.exports.__wbindgen_start?.();

const [schemaPath, url] = process.argv.slice(2);
if (!schemaPath || !url) {
  console.error('usage: node ddl.mjs SCHEMA_PRISMA POSTGRES_URL');
  process.exit(2);
}
// Prisma 7 takes connection URLs from prisma.config.ts, not the schema: drop the datasource url line.
const schema = fs.readFileSync(schemaPath, 'utf8')
  .replace(/(datasource\s+\w+\s*\{[^}]*?)\n\s*url\s*=[^\n]*/, '$1');
const parsed = new URL(url);
const adapter = bindMigrationAwareSqlAdapterFactory(new PrismaPg({
  host: parsed.searchParams.get('host') ?? parsed.hostname,
  port: parsed.port ? Number(parsed.port) : undefined,
  user: decodeURIComponent(parsed.username || 'postgres'),
  password: decodeURIComponent(parsed.password) || undefined,
  database: parsed.pathname.slice(1) || 'postgres',
}));
const engine = await bindings.SchemaEngine.new({ datamodels: [['schema.prisma', schema]] }, () => {}, adapter);
const result = await engine.diff({
  from: { tag: 'empty' },
  to: { tag: 'schemaDatamodel', files: [{ path: 'schema.prisma', content: schema }] },
  script: true, exitCode: null, filters: { externalTables: [], externalEnums: [] },
});
process.stdout.write(result.stdout ?? '');
process.exit(0);
