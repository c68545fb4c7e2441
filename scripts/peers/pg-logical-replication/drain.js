// Drains a pgoutput slot with pg-logical-replication until a commit at or past ENDPOS, like
// `inventorysync tail --endpos`: every message is decoded (rows into JavaScript objects) and
// the position acknowledged as it goes; nothing is written. Prints the rows it saw.
//
//   node drain.js <postgres-url> <slot> <publication> <endpos X/X>
import { LogicalReplicationService, PgoutputPlugin } from 'pg-logical-replication';

const [url, slot, publication, endpos] = process.argv.slice(2);
if (!endpos) {
  console.error('usage: node drain.js <postgres-url> <slot> <publication> <endpos>');
  process.exit(2);
}
const lsn = (text) => {
  const [hi, lo] = text.split('/');
  return (BigInt('0x' + hi) << 32n) | BigInt('0x' + lo);
};
const end = lsn(endpos);
const service = new LogicalReplicationService(
  { connectionString: url },
  { acknowledge: { auto: true, timeoutSeconds: 1 } },
);
const plugin = new PgoutputPlugin({ protoVersion: 1, publicationNames: [publication] });
let rows = 0;
let done = false;
service.on('data', (_at, msg) => {
  if (msg.tag === 'insert' || msg.tag === 'update' || msg.tag === 'delete') rows += 1;
  if (msg.tag === 'commit' && !done && msg.commitEndLsn && lsn(msg.commitEndLsn) >= end) {
    done = true;
    console.error(`rows=${rows}`);
    service.stop().then(() => process.exit(0));
  }
});
service.on('error', (e) => {
  if (!done) {
    console.error(`error: ${e.message}`);
    process.exit(1);
  }
});
service.subscribe(plugin, slot).catch((e) => {
  if (!done) {
    console.error(`error: ${e.message}`);
    process.exit(1);
  }
});
