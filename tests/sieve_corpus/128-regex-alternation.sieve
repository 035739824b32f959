# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "regex"];
if header :regex "from" "(bob|alice)@" {
  fileinto "yes";
} else {
  fileinto "no";
}
