# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if allof (exists "subject", header :contains "from" "alice") {
  fileinto "yes";
} else {
  fileinto "no";
}
