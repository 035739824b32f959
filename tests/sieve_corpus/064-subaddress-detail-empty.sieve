# envelope: from=alice@example.org to=bob+@example.com message=messages/plain.eml
require ["fileinto", "envelope", "subaddress"];
if envelope :detail :is "to" "" {
  fileinto "yes";
} else {
  fileinto "no";
}
